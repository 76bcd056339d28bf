"""The torch hook on real gloo ranks (2 processes on loopback) reporting to a fake agent.

One spawn of two ranks runs every check (spawning is the slow part); the
ranks post to a fake local agent served from this process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

WORKER = Path(__file__).with_name("gloo_worker.py")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run(recording_server) -> Iterator[tuple[object, list[dict]]]:
    """One spawn of the ranks; they post to a stand-in agent answering 202."""
    agent = recording_server(lambda path, body: (202, {"accepted": len(body.get("measurements", []))}))
    port, dead = _free_port(), f"http://127.0.0.1:{_free_port()}"
    env = {**__import__("os").environ, "LOCAL_WORLD_SIZE": "1"}  # one rank per node: nnodes == nranks
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(rank), str(WORLD), str(port), agent.url, dead],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for rank in range(WORLD)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    yield agent, results


def _counts(agent, job: str) -> Counter:
    counts: Counter = Counter()
    for body in agent.posted("/local/v1/measurements"):
        assert body["job_id"] == job
        for m in body["measurements"]:
            c = m["context"]
            assert m["source"] == "torch" and m["latency_us"] > 0 and m["config"] == {}
            counts[(c["collective"], c["nbytes"], c["nranks"], c["nnodes"])] += m["count"]
    return counts


def test_every_collective_is_recorded_once_per_communicator_with_nccl_sizes(run: tuple[object, list[dict]]) -> None:
    """Each call is counted once: by the communicator's lowest rank (rank 0 for the world group,
    each rank for its own 1-rank group). DDP is unmodified: its C++ reducer's bucket all-reduces
    and its start-up collectives are seen at the dispatcher."""
    agent, results = run
    bucket = 64 * 64 * 4 + 64 * 4
    assert _counts(agent, "job-gloo") == {
        ("allreduce", 4096, 2, 2): 2,  # blocking + async
        ("allgather", 4096 * WORLD, 2, 2): 2,  # total gathered bytes, tensor and list forms
        ("reducescatter", 4096, 2, 2): 1,  # total input bytes
        ("broadcast", 4096, 2, 2): 2,  # blocking + async
        ("reduce", 4096, 2, 2): 1,
        ("alltoall", 4096, 2, 2): 1,
        ("sendrecv", 4096, 2, 2): 4,  # send, recv, and the batched isend + irecv
        ("allreduce", 1024, 1, 1): WORLD,  # a 1-rank subgroup per rank: each rank is its lowest
        ("allreduce", 16, 2, 2): 1,  # on a group the job then destroys
        ("allreduce", bucket, 2, 2): 3,  # DDP's gradient bucket, one per step, from the C++ reducer
        # DDP's start-up: parameter shapes checked across ranks, then the module state broadcast
        ("allgather", 16, 2, 2): 1,
        ("broadcast", 4, 2, 2): 1,
        ("broadcast", 12, 2, 2): 1,
        ("broadcast", 48, 2, 2): 1,
        ("broadcast", bucket, 2, 2): 1,
    }
    for found in results:
        assert found["stats"]["errors"] == 0 and found["stats"]["failures"] == 0
        assert found["stats"]["backlog"] == 0
    assert results[0]["stats"]["posted"] > 0


def test_p2p_identity_is_preserved_and_pipelining_works(run: tuple[object, list[dict]]) -> None:
    _, results = run
    for rank, found in enumerate(results):
        assert found["isend_identity"] is True
        assert found["p2p_value"] == float((rank - 1) % WORLD + 1)  # batch_isend_irecv delivered
        assert found["restored"] is True


def test_the_hook_keeps_no_destroyed_group_alive(run: tuple[object, list[dict]]) -> None:
    """A group the hook described is released once the job destroys it: kept alive until the
    interpreter exits, gloo's threads would be torn down after what they need (an abort at exit)."""
    _, results = run
    assert all(found["destroyed_group_released"] for found in results)


def test_ddp_trains_correctly_under_the_hook(run: tuple[object, list[dict]]) -> None:
    _, results = run
    assert all(found["grad_finite"] for found in results)


def test_agent_down_never_raises_and_keeps_a_backlog(run: tuple[object, list[dict]]) -> None:
    _, results = run
    for found in results:
        stats = found["down_stats"]
        assert stats["errors"] == 0 and stats["posted"] == 0
    assert results[0]["down_stats"]["failures"] >= 1
    # 10 calls, every 2nd timed, reported by rank 0 only (in one or more windows)
    assert [sum(found["down_backlog"]) for found in results] == [5, 0]


def test_the_last_flush_waits_for_calls_still_in_flight() -> None:
    """A job's last gloo calls may complete (on gloo's thread) while the process is exiting: the
    final flush waits, bounded, for their callbacks, so they are counted."""
    import threading
    import time

    from dynamiccl.agent.hook.profiler import GroupInfo, Profiler
    from dynamiccl.agent.hook.table import CallKey
    from dynamiccl.schemas import Collective

    profiler = Profiler(job_id="j", sample_every=1)
    key = CallKey(Collective.allreduce, 16640, 2, 1, False)
    profiler.awaiting()
    info = GroupInfo(member=True, reports=True)
    threading.Timer(0.2, profiler.completed, (info, key, time.perf_counter(), None)).start()
    assert profiler.drain(timeout_s=5.0)
    assert profiler.table.take()[key][0] == 1
    profiler.awaiting()  # one that never completes: the wait is bounded
    started = time.monotonic()
    assert not profiler.drain(timeout_s=0.1) and time.monotonic() - started < 1.0

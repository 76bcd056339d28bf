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

WORKER = Path(__file__).with_name("hook_gloo_worker.py")
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


def test_every_collective_is_recorded_with_nccl_sizes(run: tuple[object, list[dict]]) -> None:
    agent, results = run
    n = WORLD  # every rank reports its own calls
    assert _counts(agent, "job-gloo") == {
        ("allreduce", 4096, 2, 2): 2 * n,  # blocking + async (timed at wait)
        ("allgather", 4096 * WORLD, 2, 2): 2 * n,  # total gathered bytes, tensor and list forms
        ("reducescatter", 4096, 2, 2): 1 * n,  # total input bytes
        ("broadcast", 4096, 2, 2): 2 * n,  # blocking + async (timed through its future)
        ("reduce", 4096, 2, 2): 1 * n,
        ("alltoall", 4096, 2, 2): 1 * n,
        ("sendrecv", 4096, 2, 2): 4 * n,  # send, recv, and the batched isend + irecv
        ("allreduce", 1024, 1, 1): 1 * n,  # a 1-rank subgroup
        ("allreduce", 64 * 64 * 4 + 64 * 4, 2, 2): 3 * n,  # DDP's bucket, through the comm hook
    }
    for found in results:
        assert found["stats"]["errors"] == 0 and found["stats"]["failures"] == 0
        assert found["stats"]["backlog"] == 0 and found["stats"]["posted"] > 0


def test_p2p_identity_is_preserved_and_pipelining_works(run: tuple[object, list[dict]]) -> None:
    _, results = run
    for rank, found in enumerate(results):
        assert found["isend_identity"] is True
        assert found["p2p_value"] == float((rank - 1) % WORLD + 1)  # batch_isend_irecv delivered
        assert found["restored"] is True


def test_ddp_comm_hook_keeps_training_correct(run: tuple[object, list[dict]]) -> None:
    _, results = run
    assert all(found["ddp_hook"] and found["grad_finite"] for found in results)


def test_agent_down_never_raises_and_keeps_a_backlog(run: tuple[object, list[dict]]) -> None:
    _, results = run
    for found in results:
        stats = found["down_stats"]
        assert stats["errors"] == 0 and stats["failures"] >= 1 and stats["posted"] == 0
        assert found["down_backlog"] == [5]  # 10 calls, every 2nd timed, one (context, config) cell

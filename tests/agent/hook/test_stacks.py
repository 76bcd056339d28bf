"""Ordinary training scripts (tests/agent/hook/scripts, nothing DynamICCL in them) under `dynamiccl launch`
on 2 gloo ranks: every collective their stack issues reaches the agent, once per call, sized as
NCCL's tuner counts it (API.md)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dynamiccl.workloads.services import free_port

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).with_name("scripts")
RANKS = 2


@pytest.fixture(scope="module")
def agent(recording_server):
    def answer(path: str, body: dict) -> tuple[int, dict]:
        if path == "/local/v1/measurements":
            return 202, {"accepted": len(body["measurements"])}
        return 200, {"recommendations": [], "env": {}, "tuner_config": "", "source": "default", "reason": "test"}

    return recording_server(answer)


def reported(agent, script: str) -> Counter:
    """Launch `script` on 2 ranks through torchrun; what the job's hooks posted, by context."""
    command = [sys.executable, "-m", "dynamiccl.cli.main", "launch", "--job", script, "--agent", agent.url, "--",
               sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS),
               "--master-port", str(free_port()), str(SCRIPTS / script)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    counts: Counter = Counter()
    for body in agent.posted("/local/v1/measurements"):
        if body["job_id"] != script:
            continue
        for m in body["measurements"]:
            assert m["latency_us"] > 0 and m["source"] == "torch"
            c = m["context"]
            counts[(c["collective"], c["nbytes"], c["nranks"], c["nnodes"])] += m["count"]
    return counts


def test_ddp_buckets_from_its_cpp_reducer(agent) -> None:
    bucket = (64 * 64 + 64) * 4
    assert reported(agent, "ddp_train.py") == {
        ("allreduce", bucket, 2, 1): 3,  # one gradient bucket per step
        ("allgather", 16, 2, 1): 1,  # start-up: parameter shapes compared across ranks
        ("broadcast", 4, 2, 1): 1,
        ("broadcast", 12, 2, 1): 1,
        ("broadcast", 48, 2, 1): 1,
        ("broadcast", bucket, 2, 1): 1,  # start-up: rank 0's module state
    }


def test_fsdp2_all_gathers_and_reduce_scatters(agent) -> None:
    unit = (32 * 32 + 32) * 4  # one Linear(32, 32) unit, unsharded
    assert reported(agent, "fsdp2_train.py") == {
        ("allgather", unit, 2, 1): 2 * 2 * 3,  # 2 units, forward and backward, 3 steps
        ("reducescatter", unit, 2, 1): 2 * 3,  # each unit's gradients, 3 steps
    }


def test_dtensor_tensor_parallel_functional_collectives(agent) -> None:
    counts = reported(agent, "dtensor_tp_train.py")
    assert counts[("allreduce", 4 * 16 * 4, 2, 1)] == 3  # RowwiseParallel's output, one per step
    assert set(counts) - {("allreduce", 256, 2, 1)} == {("broadcast", 64, 2, 1)}  # the mesh's seed, at start

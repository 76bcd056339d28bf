"""The DP / TP / PP training harness on gloo: it learns, every layout computes the single-process
model's loss, and the collectives it issues are the ones the trace predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dynamiccl.workloads.services import free_port
from dynamiccl.workloads.trace import Layout, ModelShape, step_trace

pytestmark = pytest.mark.slow

MODEL = dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=64, seq_len=16)
STEPS = 4
MICRO, MICRO_SIZE = 4, 2


def train(tmp_path: Path, name: str, *, tp: int = 1, pp: int = 1, dp: int = 1, micro: int = MICRO,
          steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[dict]:
    out = tmp_path / name
    world = tp * pp * dp
    options = [f"--{key.replace('_', '-')}={value}" for key, value in MODEL.items()]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               f"--master-port={free_port()}", "-m", "dynamiccl.workloads.train",
               f"--tp={tp}", f"--pp={pp}", f"--dp={dp}", f"--micro-batches={micro}",
               f"--micro-batch-size={MICRO_SIZE}", f"--steps={steps}", f"--out={out}", *options, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]


def mean_losses(results: list[dict]) -> list[float]:
    """The global batch's loss per step: the mean over data-parallel replicas of the last stage."""
    last = [r["losses"] for r in results if r["losses"] and r["tp"] == 0]
    return [sum(step) / len(last) for step in zip(*last)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The single-process model on the global batch of a dp=2 layout (2 x MICRO micro-batches)."""
    return mean_losses(train(tmp_path_factory.mktemp("single"), "single", micro=2 * MICRO, steps=STEPS))


def test_the_single_process_model_learns(tmp_path: Path) -> None:
    losses = mean_losses(train(tmp_path, "learn", steps=12, extra=("--lr=1e-2",)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("layout", [
    dict(dp=2),
    dict(tp=2, micro=2 * MICRO),
    dict(tp=2, micro=2 * MICRO, extra=("--sequence-parallel",)),
    dict(pp=2, micro=2 * MICRO, extra=("--schedule=gpipe",)),
    dict(pp=2, micro=2 * MICRO, extra=("--schedule=1f1b",)),
    dict(dp=2, extra=("--fsdp",)),
    dict(tp=2, dp=2, extra=("--fsdp",)),
], ids=["dp2-ddp", "tp2", "tp2-sp", "pp2-gpipe", "pp2-1f1b", "dp2-fsdp2", "tp2-dp2-fsdp2"])
def test_each_parallelism_computes_the_single_process_loss(tmp_path: Path, reference: list[float],
                                                           layout: dict) -> None:
    losses = mean_losses(train(tmp_path, "run", **layout))
    assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5)


def assert_traced(results: list[dict], layout: Layout) -> None:
    """Every rank recorded, call for call, what the trace predicts for the groups it is the lowest
    rank of (the hook reports a group's call once, from its lowest rank)."""
    shape = ModelShape(**{name: value for name, value in MODEL.items() if name != "seq_len"})
    for result in results:
        recorded = Counter({(c["collective"], c["nbytes"], c["nranks"], c["nnodes"]): c["calls"]
                            for c in result["calls"]})
        traced = Counter()
        for entry in step_trace(shape, layout, stage=result["pp"]):
            if result[entry.parallelism] != 0:
                continue  # not this group's lowest rank: another rank reports the group's calls
            c = entry.context
            traced[(c.collective.value, c.nbytes, c.nranks, c.nnodes)] += entry.calls * STEPS
        assert recorded == traced, f"rank {result['rank']} (stage {result['pp']})"


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["plain", "sequence-parallel"])
def test_hybrid_layout_matches_the_single_process_loss_and_issues_the_traced_collectives(
        tmp_path: Path, reference: list[float], sequence_parallel: bool) -> None:
    extra = ("--profile", "--sequence-parallel") if sequence_parallel else ("--profile",)
    results = train(tmp_path, "hybrid", tp=2, pp=2, dp=2, extra=extra)
    assert mean_losses(results) == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert_traced(results, Layout(tp=2, pp=2, dp=2, gpus_per_node=8, micro_batches=MICRO, micro_batch_size=MICRO_SIZE,
                                  seq_len=MODEL["seq_len"], dtype_bytes=4, grad_bytes=4,
                                  sequence_parallel=sequence_parallel))


def test_dtensor_tensor_parallelism_matches_the_single_process_loss_and_issues_the_traced_all_reduces(
        tmp_path: Path, reference: list[float]) -> None:
    results = train(tmp_path, "dtensor", tp=2, micro=2 * MICRO, extra=("--dtensor", "--profile"))
    assert mean_losses(results) == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert_traced(results, Layout(tp=2, gpus_per_node=2, micro_batches=2 * MICRO, micro_batch_size=MICRO_SIZE,
                                  seq_len=MODEL["seq_len"], dtype_bytes=4, grad_bytes=4, dtensor=True))


def test_fsdp2_with_tensor_parallelism_issues_the_traced_all_gathers_and_reduce_scatters(
        tmp_path: Path, reference: list[float]) -> None:
    results = train(tmp_path, "fsdp", tp=2, dp=2, extra=("--fsdp", "--profile"))
    assert mean_losses(results) == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert_traced(results, Layout(tp=2, dp=2, gpus_per_node=4, micro_batches=MICRO, micro_batch_size=MICRO_SIZE,
                                  seq_len=MODEL["seq_len"], dtype_bytes=4, grad_bytes=4, fsdp=True))

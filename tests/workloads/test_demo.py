"""`dynamiccl demo`, the project's main job, end to end (short form) and its step-time arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamiccl.schemas import Collective, Context
from dynamiccl.workloads.demo import Scenario
from dynamiccl.workloads.trace import TraceEntry


def _context(nbytes: int) -> Context:
    return Context(collective=Collective.allreduce, nbytes=nbytes, nranks=8, nnodes=1)


def test_step_time_is_the_slowest_stage_and_weights_sum_calls_over_stages() -> None:
    shared, first_only = _context(1024), _context(4096)
    scenario = Scenario("h100-ib-1n", "two stages", (
        (TraceEntry(shared, 3, "tp"), TraceEntry(first_only, 1, "tp")),
        (TraceEntry(shared, 5, "tp"),),
    ), gpus=16)
    latency = {shared: 10.0, first_only: 100.0}
    assert scenario.step_time_us(latency.__getitem__) == max(3 * 10 + 100, 5 * 10)
    assert scenario.weights() == {shared: 8, first_only: 1}
    assert scenario.contexts == [shared, first_only]


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_writes_its_table_and_figure(tmp_path: Path) -> None:
    figure = tmp_path / "demo.png"
    done = subprocess.run([sys.executable, "-m", "dynamiccl.cli.main", "demo", "--rounds", "3",
                           "--real-steps", "1", "--out", str(figure)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Communication time per training step" in done.stdout
    assert all(name in done.stdout for name in ("Llama-3-8B TP8 x DP2", "allreduce sweep", "a100-ib-2n"))
    assert "the agent sent them to the server" in done.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""`dynamiccl bench --backend gloo`: a real sweep on this machine, reported through the node agent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

pytestmark = pytest.mark.slow

EMPTY_ANSWER = {"recommendations": [], "env": {}, "tuner_config": "", "source": "server", "reason": "test"}


def test_gloo_sweep_prints_a_table_and_reports_every_timed_call_to_the_agent(recording_server) -> None:
    agent = recording_server(lambda path, body: (200, EMPTY_ANSWER) if path.endswith("recommend")
                             else (202, {"accepted": len(body["measurements"])}))
    command = [sys.executable, "-m", "dynamiccl.cli.main", "bench", "--backend", "gloo", "--nranks", "2",
               "--agent", agent.url, "--job", "sweep-1", "--min-bytes", "1024", "--max-bytes", "16384",
               "--iterations", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "allreduce on gloo: 2 ranks" in done.stdout
    assert all(f"{size:,}" in done.stdout for size in (1024, 4096, 16384))

    calls: Counter[int] = Counter()
    for batch in agent.posted("/local/v1/measurements"):
        for m in batch["measurements"]:
            assert m["job_id"] == "sweep-1" and m["context"]["nranks"] == 2 and m["context"]["nnodes"] == 1
            assert m["context"]["collective"] == "allreduce"
            calls[m["context"]["nbytes"]] += m["count"]
    assert calls == {1024: 7, 4096: 7, 16384: 7}, "3 warm-up + 4 timed calls a size, reported once (by rank 0)"


def test_gloo_cannot_be_given_an_nccl_config() -> None:
    done = subprocess.run([sys.executable, "-m", "dynamiccl.cli.main", "bench", "--backend", "gloo",
                           "--config", "ring/simple"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "gloo has no NCCL configuration" in done.stderr

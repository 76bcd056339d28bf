"""End to end against the real server: agent SIGKILLed and restarted, server down for a while;
afterwards every aggregated measurement is stored exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from polling import wait_until

from dynamiccl.agent_client import AgentClient
from dynamiccl.workloads.services import free_port

pytestmark = pytest.mark.slow

FABRIC_ID = "e2e-cpu"


class Processes:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.server_port, self.agent_port = free_port(), free_port()
        self.server_url = f"http://127.0.0.1:{self.server_port}"
        self.agent_url = f"http://127.0.0.1:{self.agent_port}"
        self.running: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp_path / f"{name}.log", "ab")
        self.running[name] = subprocess.Popen(
            [sys.executable, "-m", "dynamiccl.cli.main", *args], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "DYNAMICCL_TOKENS": ""},
        )

    def start_server(self) -> None:
        self._start("server", ["server", "--port", str(self.server_port),
                               "--database", f"sqlite:///{self.tmp_path}/server.db"])
        wait_until(lambda: httpx.get(f"{self.server_url}/healthz").status_code == 200)

    def start_agent(self, socket: bool = False) -> None:
        """The agent on loopback, or on a Unix socket (`agent_url` then is unix:PATH)."""
        listen = f"unix:{self.tmp_path / 'run' / 'agent.sock'}" if socket else f"127.0.0.1:{self.agent_port}"
        self.agent_url = listen if socket else f"http://{listen}"
        self._start("agent", ["agent", "--server", self.server_url, "--listen", listen,
                              "--spool", str(self.tmp_path / "spool"), "--fabric-id", FABRIC_ID,
                              "--window", "0.2", "--max-backoff", "0.5"])
        wait_until(lambda: agent_health(self)["status"] == "ok")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.running.pop(name)
        process.send_signal(sig)
        process.wait(timeout=15)

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.close()


def post(procs: Processes, start: int, n: int) -> None:
    """n measurements of distinct contexts, so that each is one stored row."""
    measurements = [
        {"context": {"collective": "allreduce", "nbytes": 1024 * (start + i + 1), "nranks": 2, "nnodes": 1},
         "config": {}, "latency_us": 50.0 + i, "count": 3, "source": "torch"}
        for i in range(n)
    ]
    response = httpx.post(f"{procs.agent_url}/local/v1/measurements",
                          json={"job_id": "e2e-job", "measurements": measurements})
    assert response.status_code == 202


def stored(procs: Processes) -> int:
    response = httpx.get(f"{procs.server_url}/v1/fabrics/{FABRIC_ID}")
    return response.json()["measurements"] if response.status_code == 200 else -1


def agent_health(procs: Processes) -> dict:
    with AgentClient(procs.agent_url) as agent:
        return agent.health()


def test_crash_and_outage_lose_nothing_and_count_nothing_twice(procs):
    procs.start_server()
    procs.start_agent()
    post(procs, 0, 40)
    wait_until(lambda: stored(procs) == 40)

    procs.stop("server")
    post(procs, 40, 40)
    wait_until(lambda: agent_health(procs)["spool_depth"] >= 1)  # spooled, not sent
    procs.stop("agent", signal.SIGKILL)

    procs.start_agent()
    assert agent_health(procs)["spool_depth"] >= 1  # the spool survived the kill
    post(procs, 80, 40)
    wait_until(lambda: agent_health(procs)["spool_depth"] >= 2)

    procs.start_server()
    wait_until(lambda: stored(procs) == 120 and agent_health(procs)["spool_depth"] == 0)
    time.sleep(1.0)  # any straggling duplicate would show up now
    assert stored(procs) == 120
    status = httpx.get(f"{procs.server_url}/v1/fabrics/{FABRIC_ID}").json()
    assert status["contexts"] == 120

    answer = httpx.post(f"{procs.agent_url}/local/v1/recommend", json={"job_id": "e2e-job"}).json()
    assert answer["source"] == "server"
    procs.stop("server")
    again = httpx.post(f"{procs.agent_url}/local/v1/recommend", json={"job_id": "e2e-job"}).json()
    assert again["source"] == "cache" and again["env"] == answer["env"]


TRAINING_SCRIPT = """
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
for _ in range(5):
    dist.all_reduce(torch.ones(1024))                        # 4 KiB
    dist.all_reduce(torch.ones(256 * 1024))                  # 1 MiB
    out = torch.empty(world * 256)
    dist.all_gather_into_tensor(out, torch.ones(256))        # 4 KiB gathered in all
    dist.broadcast(torch.ones(2048), src=0)                  # 8 KiB
dist.barrier()
time.sleep(0.5)  # gloo (torch 2.13) may abort at exit when a group is destroyed mid-cleanup
dist.destroy_process_group()
"""


def test_a_four_rank_gloo_job_under_launch_reaches_the_server_with_its_contexts(procs, tmp_path):
    """server + agent + an unmodified 4-rank torchrun job under `dynamiccl launch`, the job's ranks
    and the launcher reaching the agent through its Unix socket, as in the shipped deployments."""
    from dynamiccl.server.storage import SqlStore

    procs.start_server()
    procs.start_agent(socket=True)
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT)
    launch = subprocess.run(
        [sys.executable, "-m", "dynamiccl.cli.main", "launch", "--job", "gloo-e2e", "--agent", procs.agent_url,
         "--", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script)],
        capture_output=True, text=True, timeout=240,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert re.search(r"dynamiccl launch: [\d,]+ collective calls of \d+ kinds timed and received", launch.stderr)

    store = SqlStore(f"sqlite:///{procs.tmp_path}/server.db")
    try:
        def job_rows():
            return [m for m in store.measurements(FABRIC_ID) if m.job_id == "gloo-e2e"]

        wait_until(lambda: {(m.context.collective.value, m.context.nbytes) for m in job_rows()} >= {
            ("allreduce", 4096), ("allreduce", 1 << 20), ("allgather", 4 * 1024), ("broadcast", 8192)}, timeout=60)
        rows = job_rows()
    finally:
        store.close()
    assert all(m.context.nranks == 4 and m.context.nnodes == 1 for m in rows)
    assert all(m.source == "torch" and m.config.is_default for m in rows), "gloo runs no NCCL config"
    calls = {}
    for m in rows:
        key = (m.context.collective.value, m.context.nbytes)
        calls[key] = calls.get(key, 0) + m.count
    assert calls[("allreduce", 4096)] == 5, "each of the 5 calls of the communicator counted once (by rank 0)"

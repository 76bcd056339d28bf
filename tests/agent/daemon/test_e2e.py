"""End to end against the real server: agent SIGKILLed and restarted, server down for a while;
afterwards every aggregated measurement is stored exactly once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest

from polling import wait_until
from processes import Processes

from dynamiccl.agent_client import AgentClient
from dynamiccl.workloads.services import free_port

pytestmark = pytest.mark.slow

FABRIC_ID = "e2e-cpu"


@dataclass
class Node:
    """A tuning server and a node's agent (with its detected fabric), each restarted on the
    address it first had, as a sidecar and a service are."""

    processes: Processes
    server_port: int = field(default_factory=free_port)
    agent_listen: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    server_url: str = ""
    agent_url: str = ""

    def start_server(self) -> None:
        database = f"sqlite:///{self.processes.workdir / 'server.db'}"
        self.server_url = self.processes.server("server", database, port=self.server_port)

    def start_agent(self, registered: bool = True) -> None:
        self.agent_url = self.processes.agent("agent", self.server_url, FABRIC_ID, listen=self.agent_listen,
                                              fabric=(), registered=registered)

    def post(self, start: int, n: int) -> None:
        """n measurements of distinct contexts, so that each is one stored row."""
        measurements = [
            {"context": {"collective": "allreduce", "nbytes": 1024 * (start + i + 1), "nranks": 2, "nnodes": 1},
             "config": {}, "latency_us": 50.0 + i, "count": 3, "source": "torch"}
            for i in range(n)
        ]
        response = httpx.post(f"{self.agent_url}/local/v1/measurements",
                              json={"job_id": "e2e-job", "measurements": measurements})
        assert response.status_code == 202

    def stored(self) -> int:
        response = httpx.get(f"{self.server_url}/v1/fabrics/{FABRIC_ID}")
        return response.json()["measurements"] if response.status_code == 200 else -1

    def agent_health(self) -> dict:
        with AgentClient(self.agent_url) as agent:
            return agent.health()


@pytest.fixture
def node(processes) -> Node:
    return Node(processes)


def test_crash_and_outage_lose_nothing_and_count_nothing_twice(node, processes):
    node.start_server()
    node.start_agent()
    node.post(0, 40)
    wait_until(lambda: node.stored() == 40)

    processes.stop("server")
    node.post(40, 40)
    wait_until(lambda: node.agent_health()["spool_depth"] >= 1)  # spooled, not sent
    processes.stop("agent", signal.SIGKILL)

    node.start_agent(registered=False)  # the server is still down
    assert node.agent_health()["spool_depth"] >= 1  # the spool survived the kill
    node.post(80, 40)
    wait_until(lambda: node.agent_health()["spool_depth"] >= 2)

    node.start_server()
    wait_until(lambda: node.stored() == 120 and node.agent_health()["spool_depth"] == 0)
    time.sleep(1.0)  # any straggling duplicate would show up now
    assert node.stored() == 120
    status = httpx.get(f"{node.server_url}/v1/fabrics/{FABRIC_ID}").json()
    assert status["contexts"] == 120

    answer = httpx.post(f"{node.agent_url}/local/v1/recommend", json={"job_id": "e2e-job"}).json()
    assert answer["source"] == "server"
    processes.stop("server")
    again = httpx.post(f"{node.agent_url}/local/v1/recommend", json={"job_id": "e2e-job"}).json()
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


def test_a_four_rank_gloo_job_under_launch_reaches_the_server_with_its_contexts(node, tmp_path):
    """server + agent + an unmodified 4-rank torchrun job under `dynamiccl launch`, the job's ranks
    and the launcher reaching the agent through its Unix socket, as in the shipped deployments."""
    from dynamiccl.server.storage import SqlStore

    node.agent_listen = f"unix:{tmp_path / 'run' / 'agent.sock'}"
    node.start_server()
    node.start_agent()
    script = tmp_path / "train.py"
    script.write_text(TRAINING_SCRIPT)
    launch = subprocess.run(
        [sys.executable, "-m", "dynamiccl.cli.main", "launch", "--job", "gloo-e2e", "--agent", node.agent_url,
         "--", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", str(script)],
        capture_output=True, text=True, timeout=240,
    )
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert re.search(r"dynamiccl launch: [\d,]+ collective calls of \d+ kinds timed and received", launch.stderr)

    store = SqlStore(f"sqlite:///{tmp_path}/server.db")
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

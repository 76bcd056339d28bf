"""Who can reach the node agent: its local API only from its node (a Unix socket shared with the
node's jobs, or loopback), Prometheus only its metrics; and who the agent is to its server: the
token of its own node."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dynamiccl.agent.daemon.cli import local_api_address, parse_address, read_token
from dynamiccl.agent.hook.poster import Poster
from dynamiccl.agent_api import AgentUrl
from dynamiccl.agent_client import AgentClient
from dynamiccl.workloads.services import AgentProcess, free_port

pytestmark = pytest.mark.slow

MEASUREMENT = {"context": {"collective": "allreduce", "nbytes": 4096, "nranks": 2, "nnodes": 1},
               "config": {}, "latency_us": 40.0, "count": 5, "source": "torch"}


def agent_on_socket(tmp_path: Path, *options: str) -> AgentProcess:
    # the server is never reached: the agent spools, which is all these tests need
    return AgentProcess("agent", ["agent", "--server", f"http://127.0.0.1:{free_port()}", "--spool",
                                  str(tmp_path / "spool"), "--fabric-id", "listen-test", *options],
                        tmp_path, socket=tmp_path / "run" / "agent.sock")


def test_the_local_api_on_a_unix_socket_serves_the_hook_and_prometheus_gets_only_metrics(tmp_path):
    metrics_port = free_port()
    agent = agent_on_socket(tmp_path, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    agent.start()
    try:
        assert agent.url.startswith("unix:")
        poster = Poster(agent.url, "job-1", lambda: [dict(MEASUREMENT)])
        poster.flush()
        assert poster.stats.posted == 1 and poster.stats.failures == 0, "the hook posts through the socket"

        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", trust_env=False)
        assert metrics.status_code == 200 and "dynamiccl_agent_measurements_received_total" in metrics.text
        refused = httpx.post(f"http://127.0.0.1:{metrics_port}/local/v1/measurements",
                             json={"job_id": "x", "measurements": [MEASUREMENT]}, trust_env=False)
        assert refused.status_code >= 400, "the metrics listener takes no measurements"
        with AgentClient(agent.url) as client:
            assert client.health()["fabric_id"] == "listen-test"
    finally:
        agent.stop()


def test_a_socket_left_by_an_agent_that_died_is_replaced(tmp_path):
    path = tmp_path / "run" / "agent.sock"
    path.parent.mkdir()
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))  # bound, never listened on, closed: what a killed agent leaves
    leftover.close()
    agent = agent_on_socket(tmp_path)
    agent.start()
    try:
        with AgentClient(agent.url) as client:
            assert client.health()["status"] == "ok"
    finally:
        agent.stop()


@pytest.mark.parametrize("listen", ["0.0.0.0:7461", "10.0.0.7:7461", "[::]:7461", "node-1:7461"])
def test_the_local_api_is_not_served_where_other_nodes_reach_it(listen):
    with pytest.raises(ValueError, match="unix:"):
        local_api_address(listen)


def test_the_cli_says_why_it_will_not_listen_on_every_interface():
    result = subprocess.run([sys.executable, "-m", "dynamiccl.cli.main", "agent", "--server", "http://127.0.0.1:9",
                             "--listen", "0.0.0.0:7461"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "a Unix socket shared with its jobs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("listen", ["127.0.0.1:7461", "[::1]:7461", "localhost:7461", "unix:/run/dynamiccl/a.sock"])
def test_loopback_and_sockets_are_local(listen):
    assert local_api_address(listen) == parse_address(listen)


@pytest.mark.parametrize(("url", "base", "socket_path"), [
    ("unix:/run/dynamiccl/agent.sock", "http://dynamiccl-agent", "/run/dynamiccl/agent.sock"),
    ("unix:///run/dynamiccl/agent.sock", "http://dynamiccl-agent", "/run/dynamiccl/agent.sock"),
    ("http://127.0.0.1:7461/", "http://127.0.0.1:7461", None),
])
def test_agent_urls_name_a_socket_or_a_loopback_port(url, base, socket_path):
    assert AgentUrl.parse(url) == AgentUrl(base, socket_path)


@pytest.mark.parametrize("url", ["unix:", "127.0.0.1:7461", "ftp://node/agent"])
def test_a_malformed_agent_url_is_refused_with_what_it_should_be(url):
    with pytest.raises(ValueError, match="unix:/path/agent.sock"):
        AgentUrl.parse(url)


def test_an_agent_reads_its_nodes_token_from_a_file(tmp_path):
    (tmp_path / "gpu-node-1").write_text("s3cret-token\n")
    assert read_token(tmp_path / "gpu-node-1") == "s3cret-token"
    with pytest.raises(ValueError, match="dynamiccl tokens issue"):
        read_token(tmp_path / "gpu-node-2")  # a node the Secret has no key for
    (tmp_path / "two").write_text("a b\n")
    with pytest.raises(ValueError, match="does not hold one token"):
        read_token(tmp_path / "two")


def test_an_agent_without_a_token_for_its_node_stops_at_start_up_and_says_why(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dynamiccl.cli.main", "agent", "--server", "http://127.0.0.1:9",
                             "--token-file", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "dynamiccl tokens issue" in result.stderr and "Traceback" not in result.stderr

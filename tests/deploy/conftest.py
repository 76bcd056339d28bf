"""Fixtures of the deployment tests: the Prometheus binaries, and DynamICCL server / agent /
Prometheus processes on free loopback ports (stopped after the test)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from polling import wait_until

from dynamiccl.workloads.services import free_port

# The agent's fabric is the simulated preset's (h100-ib-2n): what `dynamiccl sim-job` checks.
PRESET_OVERRIDES = ["--gpu", "H100-SXM", "--gpus-per-node", "8", "--intra-node", "nvswitch",
                    "--inter-node", "ib-ndr400", "--nics-per-node", "8", "--nccl-version", "2.28.9"]


class Processes:
    """Child processes of one test, each logging to a file in its temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                       env={**os.environ, "DYNAMICCL_TOKENS": "", **(env or {})})
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-4000:]

    def wait_healthy(self, name: str, url: str, timeout: float = 60.0) -> None:
        def healthy() -> bool:
            if self.running[name].poll() is not None:
                raise AssertionError(f"{name} exited with {self.running[name].returncode}:\n{self.log(name)}")
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        wait_until(healthy, timeout, f"{name} healthy at {url}")

    def server(self, name: str, database_url: str) -> str:
        """`dynamiccl server` on a free port; its URL once healthy."""
        return self.servers([name], database_url)[0]

    def servers(self, names: list[str], database_url: str) -> list[str]:
        """Several `dynamiccl server` replicas on one database, started together; their URLs once healthy."""
        urls = []
        for name in names:
            port = free_port()
            self.start(name, [sys.executable, "-m", "dynamiccl.cli.main", "server", "--host", "127.0.0.1",
                              "--port", str(port), "--database", database_url])
            urls.append(f"http://127.0.0.1:{port}")
        for name, url in zip(names, urls):
            self.wait_healthy(name, url)
        return urls

    def agent(self, name: str, server_url: str, fabric_id: str) -> str:
        """`dynamiccl agent` for the h100-ib-2n preset on a free port; its URL once registered."""
        port = free_port()
        self.start(name, [sys.executable, "-m", "dynamiccl.cli.main", "agent", "--server", server_url,
                          "--listen", f"127.0.0.1:{port}", "--spool", str(self.workdir / f"{name}-spool"),
                          "--fabric-id", fabric_id, "--window", "0.2", "--max-backoff", "0.5",
                          *PRESET_OVERRIDES])
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(name, url)
        wait_until(lambda: httpx.get(f"{url}/healthz").json()["registered"], 30, f"{name} registered")
        return url

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=15)

    def close(self) -> None:
        for name, process in list(self.running.items()):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            del self.running[name]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.close()


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """The directory holding `prometheus` and `promtool` (scripts/prometheus.sh installs them);
    missing is a failure unless DYNAMICCL_SKIP_PROMETHEUS=1."""
    found = shutil.which("promtool"), shutil.which("prometheus")
    if None in found:
        message = ("prometheus and promtool are not on PATH: run scripts/prometheus.sh, "
                   "or set DYNAMICCL_SKIP_PROMETHEUS=1 to skip the tests that need them.")
        if os.environ.get("DYNAMICCL_SKIP_PROMETHEUS") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return Path(found[0]).parent


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """Processes shared by the tests of one module (a stack set up once)."""
    procs = Processes(tmp_path_factory.mktemp("processes"))
    yield procs
    procs.close()

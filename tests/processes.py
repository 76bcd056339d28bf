"""DynamICCL servers, agents and other child processes of a test, each logging to a file in the
test's directory and stopped after it (the `processes` fixtures in conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from polling import wait_until

from dynamiccl.agent_client import AgentClient
from dynamiccl.workloads.services import free_port

CLI = [sys.executable, "-m", "dynamiccl.cli.main"]
#: An agent's fabric as the simulated preset h100-ib-2n describes it (what `dynamiccl sim-job` checks).
PRESET_FABRIC = ("--gpu", "H100-SXM", "--gpus-per-node", "8", "--intra-node", "nvswitch",
                 "--inter-node", "ib-ndr400", "--nics-per-node", "8", "--nccl-version", "2.28.9")


def _health(url: str) -> dict:
    """A DynamICCL service's `/healthz`, over TCP or (an agent's) Unix socket."""
    if url.startswith("unix:"):
        with AgentClient(url) as agent:
            return agent.health()
    response = httpx.get(f"{url}/healthz", timeout=2)
    response.raise_for_status()
    return response.json()


class Processes:
    """Child processes of one test by name; a name started again (a restart) appends to its log."""

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
        """Wait until the process answers `/healthz` (a failure naming it, with its log, if it
        exits first)."""
        def healthy() -> bool:
            if self.running[name].poll() is not None:
                raise AssertionError(f"{name} exited with {self.running[name].returncode}:\n{self.log(name)}")
            return bool(_health(url))

        wait_until(healthy, timeout, f"{name} healthy at {url}")

    def server(self, name: str, database_url: str, port: int | None = None) -> str:
        """`dynamiccl server` (on `port`, or a free one); its URL once healthy."""
        url = self._start_server(name, database_url, port or free_port())
        self.wait_healthy(name, url)
        return url

    def servers(self, names: list[str], database_url: str) -> list[str]:
        """`dynamiccl server` replicas on one database, started together; their URLs once healthy."""
        urls = [self._start_server(name, database_url, free_port()) for name in names]
        for name, url in zip(names, urls):
            self.wait_healthy(name, url)
        return urls

    def _start_server(self, name: str, database_url: str, port: int) -> str:
        self.start(name, [*CLI, "server", "--host", "127.0.0.1", "--port", str(port), "--database", database_url])
        return f"http://127.0.0.1:{port}"

    def agent(self, name: str, server_url: str, fabric_id: str, listen: str | None = None,
              fabric: Sequence[str] = PRESET_FABRIC, registered: bool = True) -> str:
        """`dynamiccl agent` listening on `listen` (HOST:PORT or unix:PATH; default a free loopback
        port), its spool in the test's directory, its fabric given by `fabric` (empty: detected);
        its URL once healthy and, with `registered`, once it has registered its fabric."""
        listen = listen or f"127.0.0.1:{free_port()}"
        url = listen if listen.startswith("unix:") else f"http://{listen}"
        self.start(name, [*CLI, "agent", "--server", server_url, "--listen", listen,
                          "--spool", str(self.workdir / f"{name}-spool"), "--fabric-id", fabric_id,
                          "--window", "0.2", "--max-backoff", "0.5", *fabric])
        self.wait_healthy(name, url)
        if registered:
            wait_until(lambda: _health(url)["registered"], 30, f"{name} registered")
        return url

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.running.pop(name)
        process.send_signal(sig)
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


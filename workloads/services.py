"""A tuning server and a node agent as local processes on free loopback ports (demo, benchmarks, tests)."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from dynamiccl.agent_client import AgentClient, AgentError

CLI = [sys.executable, "-m", "dynamiccl.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """One `dynamiccl` service on 127.0.0.1: started, stopped, killed (SIGKILL) and restarted on the
    same port; its output goes to `workdir/<name>.log`."""

    def __init__(self, name: str, arguments: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.workdir, self.env = name, Path(workdir), env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*CLI, *arguments, *self._listen_options()]
        self.log = self.workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def _listen_options(self) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout_s: float = 60.0) -> None:
        with self.log.open("a") as output:
            self.process = subprocess.Popen(self.command, cwd=self.workdir, env={**os.environ, **self.env},
                                            stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.name} did not start; {self.log} ends:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a power cut or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mib(self) -> float:
        """Resident memory of the process (MiB), from /proc; NaN when it is not running."""
        if self.process is None or self.process.poll() is not None:
            return math.nan
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return math.nan


class AgentProcess(ServiceProcess):
    """A node agent on a loopback port, or with `socket` on that Unix socket (`url` then is
    `unix:PATH`, for `AgentClient`)."""

    def __init__(self, name: str, arguments: list[str], workdir: Path, socket: Path | None = None) -> None:
        self.socket = socket
        super().__init__(name, arguments, workdir)
        if socket is not None:
            self.url = f"unix:{socket}"

    def _listen_options(self) -> list[str]:
        return ["--listen", f"unix:{self.socket}" if self.socket else f"127.0.0.1:{self.port}"]

    def healthy(self) -> bool:
        try:
            with AgentClient(self.url, timeout=1) as agent:
                agent.health()
        except (httpx.TransportError, AgentError):
            return False
        return True


def server_process(database_url: str, workdir: Path, env: dict[str, str] | None = None) -> ServiceProcess:
    """`dynamiccl server` on `database_url` (not started)."""
    return ServiceProcess("tuning-server", ["server", "--database", database_url], workdir, env)


@contextmanager
def local_server(database_url: str, workdir: Path, env: dict[str, str] | None = None) -> Iterator[ServiceProcess]:
    """A started tuning server, stopped on exit."""
    server = server_process(database_url, workdir, env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def local_agent(server_url: str, workdir: Path, window_s: float = 1.0) -> Iterator[ServiceProcess]:
    """A started `dynamiccl agent` for this machine, spooling under workdir, stopped on exit."""
    agent = AgentProcess("node-agent", ["agent", "--server", server_url, "--spool", str(Path(workdir) / "spool"),
                                        "--window", str(window_s), "--max-backoff", "1"], workdir)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()

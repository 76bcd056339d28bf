"""A tuning server and a node agent as local processes on free loopback ports (demo, benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

CLI = [sys.executable, "-m", "dynamiccl.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(process: subprocess.Popen, url: str, what: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the {what} did not start; its log ({log}) ends:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


@contextmanager
def _process(command: list[str], url: str, what: str, workdir: Path, env: dict[str, str],
             timeout_s: float) -> Iterator[str]:
    log = workdir / f"{what.replace(' ', '-')}.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=workdir, env={**os.environ, **env}, stdout=output,
                                   stderr=subprocess.STDOUT)
        try:
            _wait_healthy(process, url, what, timeout_s, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def local_server(database_url: str, workdir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """`dynamiccl server` on 127.0.0.1; yields its URL. Output goes to workdir/tuning-server.log."""
    port = free_port()
    command = [*CLI, "server", "--host", "127.0.0.1", "--port", str(port), "--database", database_url]
    with _process(command, f"http://127.0.0.1:{port}", "tuning server", workdir, {}, timeout_s) as url:
        yield url


@contextmanager
def local_agent(server_url: str, workdir: Path, window_s: float = 1.0, timeout_s: float = 60.0) -> Iterator[str]:
    """`dynamiccl agent` for this machine on 127.0.0.1, spooling under workdir; yields its URL."""
    port = free_port()
    command = [*CLI, "agent", "--server", server_url, "--listen", f"127.0.0.1:{port}",
               "--spool", str(workdir / "spool"), "--window", str(window_s), "--max-backoff", "1"]
    with _process(command, f"http://127.0.0.1:{port}", "node agent", workdir, {}, timeout_s) as url:
        yield url

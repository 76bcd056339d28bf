"""`dynamiccl server` runs uvicorn, says where it listens, which database (password hidden) and
whether auth is on; the CLI does not import the server until that command runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from dynamiccl.cli.main import app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_imports_the_server_lazily():
    code = "import sys, dynamiccl.cli.main; assert not [m for m in sys.modules if m.startswith('dynamiccl.server')]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_command_options():
    result = CliRunner().invoke(app, ["server", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--host", "--port", "--database", "--tokens-file"):
        assert option in result.output


def test_server_starts_and_reports_its_settings(tmp_path):
    port = _free_port()
    database = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DYNAMICCL_DATABASE_URL": database}
    env.pop("DYNAMICCL_TOKENS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "dynamiccl.cli.main", "server", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("server did not answer")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}" in output
    assert database in output
    assert "auth off" in output and "one client can speak as many sources" in output


def test_passwords_are_hidden_in_the_logged_url():
    from dynamiccl.server.app import masked

    assert masked("postgresql+psycopg://u:hunter2@db:5432/x") == "postgresql+psycopg://u:***@db:5432/x"

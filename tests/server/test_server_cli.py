"""`dynamiccl server` runs uvicorn, says where it listens, which database (password hidden) and
whether auth is on; the CLI does not import the server until that command runs."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from typer.testing import CliRunner

from polling import wait_until

from dynamiccl.cli.main import app
from dynamiccl.workloads.services import free_port


def test_the_cli_imports_the_server_lazily():
    code = "import sys, dynamiccl.cli.main; assert not [m for m in sys.modules if m.startswith('dynamiccl.server')]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_command_options():
    result = CliRunner().invoke(app, ["server", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--host", "--port", "--database", "--tokens-file", "--workers"):
        assert option in result.output


def test_server_starts_and_reports_its_settings(tmp_path):
    port = free_port()
    database = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "DYNAMICCL_DATABASE_URL": database}
    env.pop("DYNAMICCL_TOKENS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "dynamiccl.cli.main", "server", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}, 20,
                   "the server answers")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}" in output
    assert database in output
    assert "auth off" in output and "one client can speak as many sources" in output


def test_passwords_are_hidden_in_the_logged_url():
    from dynamiccl.server.app import masked

    assert masked("postgresql+psycopg://u:hunter2@db:5432/x") == "postgresql+psycopg://u:***@db:5432/x"


def test_several_workers_serve_one_port_and_give_a_job_one_answer(tmp_path, examples):
    """`--workers 2`: two processes, each with its own learner, on one port and one database;
    whichever answers, a job gets its one pinned recommendation and every batch is stored once."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DYNAMICCL_")}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dynamiccl.cli.main", "server", "--port", str(port), "--workers", "2",
             "--database", f"sqlite:///{tmp_path / 'workers.db'}"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        """Both workers started (however slow the machine) and the port answers."""
        assert process.poll() is None, log.read_text()
        return log.read_text().count("Started server process") == 2 and httpx.get(f"{url}/healthz").is_success

    try:
        wait_until(serving, 60, "the two workers start and answer")
        httpx.put(f"{url}/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC).raise_for_status()
        for _ in range(3):  # a retried batch: stored once, whichever worker takes it
            httpx.post(f"{url}/v1/measurements", json=examples.batch(n=5)).raise_for_status()
        answers = set()
        for _ in range(12):  # fresh connections: both workers get some of them
            answer = httpx.post(f"{url}/v1/recommend", json=examples.recommend(job_id="job-1"), timeout=30)
            answers.add(answer.raise_for_status().text)
        assert len(answers) == 1
        assert httpx.get(f"{url}/v1/fabrics/{examples.FABRIC_ID}").json()["measurements"] == 5
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "2 worker processes" in log.read_text()

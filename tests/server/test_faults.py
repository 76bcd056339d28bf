"""Faults: the server killed with SIGKILL mid-ingest keeps everything it acknowledged (SQLite and
PostgreSQL); an unreachable database is a 503 with Retry-After, and the node agent's sender
spools through it and delivers everything once the database is back; PostgreSQL crash-restarted
under load costs nothing acknowledged and counts nothing twice; a full database is a 503 that
leaves nothing half-written; a launch with neither server nor agent still starts the job,
on NCCL's defaults."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from dynamiccl.agent.daemon.sender import Sender
from dynamiccl.agent.daemon.spool import Spool
from dynamiccl.client import DynamicclClient
from dynamiccl.schemas import Measurement
from dynamiccl.server.app import create_app
from dynamiccl.server.storage import SqlStore
from dynamiccl.workloads.services import free_port, server_process


def _post_until_killed(url: str, examples, acknowledged: dict[str, int], stop: threading.Event, worker: int) -> None:
    sequence = 0
    while not stop.is_set():
        batch = examples.batch(batch_id=f"w{worker}-{sequence:05d}", n=30)
        try:
            response = httpx.post(f"{url}/v1/measurements", json=batch, timeout=10)
        except httpx.TransportError:
            return  # the server died under us: whatever was not acknowledged may be lost
        if response.status_code == 202:
            acknowledged[batch["batch_id"]] = response.json()["accepted"]
        sequence += 1


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_during_ingest_loses_nothing_acknowledged(reliability, examples, tmp_path, request, backend):
    url = (f"sqlite:///{tmp_path / 'kill.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_schema_url"))
    server = server_process(url, tmp_path)
    server.start()
    try:
        assert httpx.put(f"{server.url}/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC).status_code == 201
        acknowledged: dict[str, int] = {}
        stop = threading.Event()
        workers = [threading.Thread(target=_post_until_killed, args=(server.url, examples, acknowledged, stop, i))
                   for i in range(4)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()  # mid-ingest: the workers are still posting
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        assert len(acknowledged) >= 20
        server.start()  # recovery on restart: the database opens, nothing to repair by hand
        for batch_id, accepted in acknowledged.items():
            resent = httpx.post(f"{server.url}/v1/measurements", json=examples.batch(batch_id=batch_id, n=30))
            assert resent.status_code == 202 and resent.json()["duplicate_batch"], batch_id
        status = httpx.get(f"{server.url}/v1/fabrics/{examples.FABRIC_ID}").json()
        assert status["measurements"] >= sum(acknowledged.values())
    finally:
        server.stop()
    store = SqlStore(url)
    try:
        with store.engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT batch_id, count FROM batches")).all())
            stored = dict(conn.execute(sa.text(
                "SELECT b.batch_id, count(m.id) FROM batches b JOIN measurements m ON m.batch_pk = b.id "
                "GROUP BY b.batch_id")).all())
    finally:
        store.close()
    for batch_id, accepted in acknowledged.items():
        assert rows[batch_id] == accepted == stored[batch_id] == 30, batch_id
    assert all(stored.get(batch_id) == count for batch_id, count in rows.items()), "a batch is stored whole or not"


class TcpProxy:
    """A loopback TCP relay to `target` that can cut every connection and refuse new ones."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.up.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def proxied_postgres(postgres_schema_url: str) -> Iterator[tuple[str, TcpProxy]]:
    url = sa.make_url(postgres_schema_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    proxy.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_database_down_is_503_and_the_agent_delivers_everything_when_it_is_back(
    reliability, proxied_postgres, examples, tmp_path
):
    url, proxy = proxied_postgres
    server = server_process(url, tmp_path)
    server.start()
    spool = Spool(tmp_path / "spool.db")
    client = DynamicclClient(server.url, attempts=1, timeout=10)
    sender = Sender(spool, client, base_backoff=0.05, max_backoff=0.5, idle_poll=0.05)
    try:
        assert httpx.put(f"{server.url}/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC).status_code == 201
        proxy.cut()
        for path, body in [("/v1/measurements", examples.batch()), ("/v1/suggest", examples.suggest()),
                           ("/v1/recommend", examples.recommend())]:
            response = httpx.post(server.url + path, json=body, timeout=30)
            assert response.status_code == 503, (path, response.text)
            assert int(response.headers["Retry-After"]) >= 1 and "database" in response.json()["detail"]
        assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 200  # still scrapeable

        sender.start()
        measurements = [Measurement.model_validate(examples.measurement(nbytes=1024 * (i + 1))) for i in range(30)]
        for i in range(0, 30, 10):
            spool.put(examples.FABRIC_ID, measurements[i:i + 10])
        time.sleep(1.0)
        assert spool.depth() == 3 and sender.failures >= 1  # held, retried, not dropped

        proxy.restore()
        deadline = time.monotonic() + 30
        while spool.depth() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spool.depth() == 0 and spool.dropped == 0
        status = httpx.get(f"{server.url}/v1/fabrics/{examples.FABRIC_ID}", timeout=30).json()
        assert status["measurements"] == 30
    finally:
        sender.stop()
        client.close()
        spool.close()
        server.stop()


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb, pg_ctl as the postgres user), so that it can
    be restarted without touching the one the other tests share."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if os.geteuid() != 0 or not bins or shutil.which("runuser") is None:
            pytest.skip("a private PostgreSQL needs root, runuser and Debian's postgresql binaries")
        self.bin = bins[-1].parent
        self.directory = Path(tempfile.mkdtemp(prefix="dynamiccl-pg-", dir="/tmp"))
        shutil.chown(self.directory, "postgres")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres("initdb", "-D", str(self.directory / "data"), "-A", "trust", "-U", "postgres")
        self.start()

    def _as_postgres(self, tool: str, *arguments: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *arguments], check=True,
                       capture_output=True, timeout=120)

    def _ctl(self, action: str, *options: str) -> None:
        settings = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory}"
        self._as_postgres("pg_ctl", "-D", str(self.directory / "data"), "-o", settings, "-w", *options, action)

    def start(self) -> None:
        self._ctl("start", "-l", str(self.directory / "log"))

    def crash_restart(self) -> None:
        """Stopped as a crash would (`immediate`: in-flight transactions die, recovery on start)."""
        self._ctl("stop", "-m", "immediate")
        self.start()

    def close(self) -> None:
        try:
            self._ctl("stop", "-m", "fast")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _post_until_stored(url: str, examples, acknowledged: dict[str, int], stop: threading.Event, worker: int,
                       refusals: list[int]) -> None:
    """As an agent does: each batch re-sent with its id until the server acknowledges it."""
    sequence = 0
    while not stop.is_set():
        batch = examples.batch(batch_id=f"w{worker}-{sequence:05d}", n=30)
        while True:
            try:
                response = httpx.post(f"{url}/v1/measurements", json=batch, timeout=30)
            except httpx.TransportError:
                refusals.append(0)
                time.sleep(0.1)
                continue
            if response.status_code == 202:
                acknowledged[batch["batch_id"]] = response.json()["accepted"]
                break
            assert response.status_code == 503, response.text  # never a 500, never a half answer
            refusals.append(503)
            time.sleep(0.1)
        sequence += 1


@pytest.mark.slow
def test_postgres_restarted_under_load_loses_nothing_acknowledged_and_counts_nothing_twice(examples, tmp_path):
    postgres = PrivatePostgres()
    server = server_process(postgres.url, tmp_path)
    try:
        server.start()
        assert httpx.put(f"{server.url}/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC).status_code == 201
        acknowledged: dict[str, int] = {}
        refusals: list[int] = []
        stop = threading.Event()
        workers = [threading.Thread(target=_post_until_stored,
                                    args=(server.url, examples, acknowledged, stop, i, refusals)) for i in range(4)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        postgres.crash_restart()  # under load: the workers are posting
        before = len(acknowledged)
        while len(acknowledged) < before + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        assert len(acknowledged) >= before + 20, "the server reconnected and ingests again"
        assert refusals, "the restart was felt"
        status = httpx.get(f"{server.url}/v1/fabrics/{examples.FABRIC_ID}", timeout=30).json()
        assert status["measurements"] == 30 * len(acknowledged), "nothing acknowledged lost, nothing twice"
    finally:
        server.stop()
        postgres.close()


def test_a_full_database_is_503_with_nothing_half_written_and_ingest_resumes_once_there_is_room(
        tmp_path, examples):
    store = SqlStore(f"sqlite:///{tmp_path / 'full.db'}")
    limit = {"pages": 1_000_000}

    @sa.event.listens_for(store.engine, "connect")
    def disk_size(connection, _record) -> None:  # the pages SQLite may use: what a full disk is to it
        connection.execute(f"PRAGMA max_page_count = {limit['pages']}")

    app = create_app(store=store, tokens={})
    with TestClient(app) as client:
        assert client.put(f"/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC).status_code == 201
        with store.engine.connect() as conn:
            limit["pages"] = conn.exec_driver_sql("PRAGMA page_count").scalar_one() + 3
        store.engine.dispose()  # every new connection now sees the small disk
        acknowledged, refused = 0, None
        for i in range(200):
            batch = examples.batch(batch_id=f"b{i:03d}", n=30)
            response = client.post("/v1/measurements", json=batch)
            if response.status_code != 202:
                refused = (batch, response)
                break
            acknowledged += 30
        assert refused is not None and acknowledged > 0, "the disk filled after some batches"
        batch, response = refused
        assert response.status_code == 503 and response.json()["detail"].startswith("the database is full")
        assert int(response.headers["Retry-After"]) >= 1
        limit["pages"] = 1_000_000
        store.engine.dispose()
        assert client.get(f"/v1/fabrics/{examples.FABRIC_ID}").json()["measurements"] == acknowledged, \
            "the refused batch left nothing behind"
        assert client.post("/v1/measurements", json=batch).status_code == 202, "its retry is taken once there is room"
        assert client.get(f"/v1/fabrics/{examples.FABRIC_ID}").json()["measurements"] == acknowledged + 30


def test_launch_with_neither_server_nor_agent_starts_the_job_on_defaults(tmp_path):
    def dead_url() -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{sock.getsockname()[1]}"

    probe = "import json, os; print(json.dumps(sorted(k for k in os.environ if k.startswith('NCCL_'))))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "DYNAMICCL_"))}
    for where in (["--server", dead_url(), "--fabric-id", "dgx"], ["--agent", dead_url()]):
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "dynamiccl.cli.main", "launch", "--job", "j", *where,
                               "--", sys.executable, "-c", probe],
                              capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], "NCCL decides: no variable set"
        assert "default" in proc.stderr and time.monotonic() - started < 60

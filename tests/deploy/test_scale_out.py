"""Horizontal scale: two server processes on one PostgreSQL database, clients spread over both.
A batch posted to both is stored once, both give the same pinned recommendation and suggestions,
and a replica SIGKILLed mid-load loses nothing it acknowledged."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import sqlalchemy as sa
from polling import wait_until

from dynamiccl.nccl.space import candidate_configs
from dynamiccl.schemas import Context
from dynamiccl.sim import SimulatedFabric, get_preset

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

POSTGRES_URL = os.environ.get(
    "DYNAMICCL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/dynamiccl_test"
)
PRESET = get_preset("h100-ib-2n")
FABRIC_ID = "scale-h100"
FABRIC = PRESET.fabric.model_dump(mode="json")
CONTEXTS = [Context(collective="allreduce", nbytes=1 << e, nranks=16, nnodes=2) for e in (16, 20, 24, 28)]


@dataclass
class Replicas:
    a: str
    b: str
    database: sa.Engine

    def stored(self) -> dict[str, int]:
        """batch_id -> measurements stored under it, read from the database itself."""
        query = sa.text("SELECT b.batch_id, count(m.id) FROM batches b LEFT JOIN measurements m "
                        "ON m.batch_pk = b.id GROUP BY b.batch_id")
        with self.database.connect() as conn:
            return dict(conn.execute(query).all())


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A database of its own, dropped afterwards (the replicas create the schema)."""
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"dynamiccl_scale_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as error:
        admin.dispose()
        message = (f"PostgreSQL is not reachable at {POSTGRES_URL} ({error.orig}): run scripts/postgres.sh "
                   "or set DYNAMICCL_SKIP_POSTGRES=1")
        if os.environ.get("DYNAMICCL_SKIP_POSTGRES") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def replicas(processes, fresh_database) -> Iterator[Replicas]:
    a, b = processes.servers(["server-a", "server-b"], fresh_database)
    assert httpx.put(f"{a}/v1/fabrics/{FABRIC_ID}", json=FABRIC).status_code == 201
    engine = sa.create_engine(fresh_database)
    yield Replicas(a, b, engine)
    engine.dispose()


def batch(batch_id: str, n: int, offset: int = 0) -> dict:
    """n measurements of distinct contexts, alternating the default and ring/ll128/16."""
    configs = ({}, {"algo": "ring", "proto": "ll128", "nchannels": 16})
    return {"fabric_id": FABRIC_ID, "batch_id": batch_id, "measurements": [
        {"context": {"collective": "allreduce", "nbytes": 1024 + offset + i, "nranks": 16, "nnodes": 2},
         "config": configs[i % 2], "latency_us": 100.0 + i % 7, "count": 5, "source": "sim"}
        for i in range(n)]}


def test_a_batch_posted_to_both_replicas_at_once_is_stored_once(replicas):
    batches, size = 30, 40
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(8) as pool:
        futures = {(i, url): pool.submit(http.post, f"{url}/v1/measurements", json=batch(f"twice-{i}", size, i * size))
                   for i in range(batches) for url in (replicas.a, replicas.b)}
        answers = {key: future.result() for key, future in futures.items()}
    for i in range(batches):
        pair = [answers[(i, url)] for url in (replicas.a, replicas.b)]
        assert [r.status_code for r in pair] == [202, 202]
        assert sorted(r.json()["duplicate_batch"] for r in pair) == [False, True], f"batch {i}"
        assert sum(r.json()["accepted"] for r in pair) == size
    assert replicas.stored() == {f"twice-{i}": size for i in range(batches)}
    for url in (replicas.a, replicas.b):
        assert httpx.get(f"{url}/v1/fabrics/{FABRIC_ID}").json()["measurements"] == batches * size


def test_both_replicas_give_the_same_recommendation_and_suggestions_for_a_job(replicas):
    sim = SimulatedFabric(PRESET, seed=7)
    measurements = [
        {"context": c.model_dump(mode="json"), "config": config.model_dump(mode="json"),
         "latency_us": sim.run(c, config), "count": 20, "source": "sim"}
        for _ in range(4) for c in CONTEXTS for config in candidate_configs(PRESET.fabric, c)]
    half = len(measurements) // 2
    for n, (url, part) in enumerate([(replicas.a, measurements[:half]), (replicas.b, measurements[half:])]):
        body = {"fabric_id": FABRIC_ID, "batch_id": f"seed-{n}", "measurements": part}
        assert httpx.post(f"{url}/v1/measurements", json=body, timeout=30).status_code == 202
    for url in (replicas.a, replicas.b):  # each replica's learner has caught up with the shared store
        wait_until(lambda url=url: httpx.get(f"{url}/v1/fabrics/{FABRIC_ID}").json()["learner"].get(
            "measurements_learned") == len(measurements), 60, f"learner of {url} caught up")

    contexts = [c.weighted(10.0).model_dump(mode="json") for c in CONTEXTS]
    jobs = [f"job-{i}" for i in range(6)]
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(4) as pool:
        def ask(url: str, path: str, body: dict) -> dict:
            response = http.post(f"{url}{path}", json={"fabric_id": FABRIC_ID, **body})
            assert response.status_code == 200, response.text
            return response.json()

        # The first calls of each job race on both replicas at once.
        first = {(job, url): pool.submit(ask, url, "/v1/recommend", {"job_id": job, "contexts": contexts})
                 for job in jobs for url in (replicas.a, replicas.b)}
        suggested = {(job, url): pool.submit(ask, url, "/v1/suggest", {"job_id": job, "round": 3,
                                                                       "contexts": contexts})
                     for job in jobs for url in (replicas.a, replicas.b)}
        for job in jobs:
            answer = first[(job, replicas.a)].result()
            assert first[(job, replicas.b)].result() == answer
            for url in (replicas.a, replicas.b):  # later calls get the pinned answer
                assert ask(url, "/v1/recommend", {"job_id": job, "contexts": contexts}) == answer
            assert suggested[(job, replicas.a)].result() == suggested[(job, replicas.b)].result()
    configs = [r["config"] for r in first[(jobs[0], replicas.a)].result()["recommendations"]]
    assert len(configs) == len(CONTEXTS)


def test_a_replica_killed_mid_load_loses_nothing_it_acknowledged(replicas, processes):
    clients, per_client, size = 4, 40, 100
    acknowledged: dict[str, dict] = {}  # batch_id -> the 202 body that acknowledged it
    failed_on_b = 0
    lock = threading.Lock()
    b_acks = threading.Semaphore(0)
    killed = threading.Event()

    def client(n: int) -> None:
        nonlocal failed_on_b
        with httpx.Client(timeout=30) as http:
            for i in range(per_client):
                batch_id = f"load-{n}-{i}"
                body = batch(batch_id, size, (n * per_client + i) * size)
                order = [replicas.a, replicas.b] if i % 2 else [replicas.b, replicas.a]
                for url in order:  # an agent's retry: the same batch id, to the other replica
                    try:
                        response = http.post(f"{url}/v1/measurements", json=body)
                    except httpx.TransportError:
                        with lock:
                            failed_on_b += url == replicas.b
                        continue
                    assert response.status_code == 202, response.text
                    with lock:
                        acknowledged[batch_id] = response.json()
                    if url == replicas.b:
                        b_acks.release()
                    break

    def killer() -> None:
        for _ in range(15):  # replica b has acknowledged 15 batches: kill it mid-load
            b_acks.acquire()
        processes.stop("server-b", signal.SIGKILL)
        killed.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    threads.append(threading.Thread(target=killer, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads[:-1]:
        thread.join(timeout=240)
    assert killed.is_set(), "replica b was never killed"
    assert failed_on_b > 0, "the load went on after the kill"

    total = clients * per_client
    stored = replicas.stored()
    assert len(acknowledged) == total  # every batch was acknowledged by one replica or the other
    assert stored == {batch_id: size for batch_id in acknowledged}  # each whole, none twice, none lost
    accepted = sum(body["accepted"] for body in acknowledged.values())
    lost_acks = sum(body["duplicate_batch"] for body in acknowledged.values())
    # A batch b stored but could not acknowledge before it died is acknowledged as a duplicate.
    assert accepted + lost_acks * size == sum(stored.values()) == total * size
    assert httpx.get(f"{replicas.a}/v1/fabrics/{FABRIC_ID}").json()["measurements"] == total * size

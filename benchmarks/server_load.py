"""Server load: what clients wait for, on SQLite and PostgreSQL, with 1 and N worker processes.

Per database and worker count, a real `dynamiccl server` on 127.0.0.1 is driven over HTTP:
* ingest: `--clients` threads post `--batches` 1,000-measurement batches of a simulated
  fabric (132 contexts, every candidate config, latencies from `dynamiccl.sim`), encoded
  before the clock starts and sent on keep-alive connections, as an agent sends its spool:
  measurements stored per second of wall time;
* learner lag after that burst: the time from the last 202 to a recommendation of 100
  contexts that took every batch in (the server waits for its learner, at most its bound, or
  answers `learner.behind`), and to the end of the next background refit of the surrogate;
* latency under load: 20 concurrent clients, each sending `--requests` requests of 100
  distinct contexts drawn at random from the 132 (random weights), to `/v1/recommend`, to
  `/v1/suggest` unpinned and pinned (a job and round, as an online tuning round asks), and
  to `/healthz`, the floor: the same server, the same HTTP stack and concurrency, no work.
  Each latency is printed beside the floor's, as a ratio, and with the server's CPU time a
  request (its processes' user and system time over the timed requests). A warm-up of one
  request per client precedes each phase (a fresh worker decides each context once per
  snapshot; a worker asked for the first time catches up and refits), and the clock starts
  once the server is idle;
* small batches: the same 20 clients post batches of 10 measurements, as node agents do each
  window: batches answered a second;
* memory: resident set of the server's processes at the end.
Loopback only; every loop is bounded.

Usage: python benchmarks/server_load.py [--batches 63] [--requests 25] [--workers 1 --workers 2]
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table
from sqlalchemy import create_engine, text

from dynamiccl.nccl.space import candidate_configs
from dynamiccl.schemas import Collective, Context, Measurement
from dynamiccl.sim import PRESETS, SimulatedFabric
from dynamiccl.workloads.services import ServiceProcess

POSTGRES_SERVER = os.environ.get("DYNAMICCL_BENCH_POSTGRES_SERVER", "postgresql+psycopg://postgres@127.0.0.1:5432")
POSTGRES_URL = f"{POSTGRES_SERVER}/dynamiccl_bench"
PRESET = PRESETS["h100-ib-4n"]
FABRIC_ID = "load"
CONCURRENCY = 20
PER_REQUEST = 100
BATCH = 1000
SMALL_BATCH = 10
console = Console(width=160)
_REFITS = re.compile(r"^dynamiccl_refit_duration_seconds_count (\S+)$", re.MULTILINE)


def fabric_contexts() -> list[Context]:
    """132 kinds of call: 4 collectives on 1, 2 and 4 nodes, 4 KiB to 4 GiB."""
    collectives = (Collective.allreduce, Collective.allgather, Collective.reducescatter, Collective.broadcast)
    return [Context(collective=c, nbytes=4096 * 4**k, nranks=8 * nodes, nnodes=nodes)
            for c in collectives for nodes in (1, 2, 4) for k in range(11)]


def batch_bodies(batches: int, contexts: list[Context]) -> list[dict]:
    """Batches of measurements of random (context, candidate config) pairs, as the simulator runs them."""
    sim, rng = SimulatedFabric(PRESET, seed=0), np.random.default_rng(0)
    bodies = []
    for index in track(range(batches), description="simulating measurements", console=console):
        measurements = []
        for _ in range(BATCH):
            context = contexts[int(rng.integers(len(contexts)))]
            configs = candidate_configs(sim.fabric, context)
            config = configs[int(rng.integers(len(configs)))]
            measurements.append(Measurement(context=context, config=config, latency_us=sim.run(context, config),
                                            count=20, source="sim", job_id=f"job-{index % 8}"))
        bodies.append({"fabric_id": FABRIC_ID, "batch_id": f"load-{index}",
                       "measurements": [m.model_dump(mode="json", exclude_none=True) for m in measurements]})
    return bodies


def fresh_postgres() -> str:
    """An empty database of the benchmark's own (scripts/postgres.sh starts the server)."""
    admin = create_engine(f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS dynamiccl_bench WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE dynamiccl_bench"))
    admin.dispose()
    return POSTGRES_URL


def _process_tree(pid: int) -> list[int]:
    """A process and its descendants (uvicorn's workers)."""
    found, pids = [], [pid]
    while pids:
        current = pids.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found.append(current)
        pids += [int(child) for child in children]
    return found


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    total = 0
    for current in _process_tree(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE).group(1))
        except (OSError, AttributeError):
            continue
    return total / 1024


def cpu_s(pid: int) -> float:
    """CPU time (user and system) a process and its children have used, seconds."""
    total = 0
    for current in _process_tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def refits(url: str) -> float:
    match = _REFITS.search(httpx.get(f"{url}/metrics", timeout=30).text)
    return float(match.group(1)) if match else 0.0


@dataclass
class Latencies:
    p50_ms: float
    p99_ms: float
    per_second: float  # timed requests answered a second, all clients together
    cpu_ms: float  # the server's CPU time a timed request (all its processes, background work included)


#: One request: method, path and JSON body (None: no body).
Request = tuple[str, str, dict | None]


def settle(server_pid: int, timeout_s: float = 30.0) -> None:
    """Until the server's processes use under a tenth of a core over a quarter second: a worker
    whose first request made it catch up refits in the background, which is not the next
    phase's cost."""
    deadline = time.monotonic() + timeout_s
    before = cpu_s(server_pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_s(server_pid)
        if now - before < 0.025:
            return
        before = now


def under_load(url: str, server_pid: int, request: Callable[[np.random.Generator], Request],
               requests: int) -> Latencies:
    """CONCURRENCY clients on keep-alive connections, each sending one warm-up (with several
    workers, each worker is asked and catches up) and then, once the server has settled,
    `requests` timed requests. Bodies are encoded before the clock starts and clients use the
    standard library's HTTP client, so that on a machine shared with the server the clients
    cost it as little as they can (httpx costs about twice a bare request's server time)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    warmed, start = threading.Barrier(CONCURRENCY + 1), threading.Barrier(CONCURRENCY + 1)

    def client(index: int) -> list[float]:
        rng = np.random.default_rng(index)
        prepared = [(method, path, json.dumps(body).encode() if body is not None else None)
                    for method, path, body in (request(rng) for _ in range(requests + 1))]
        connection = http.client.HTTPConnection(host, port, timeout=120)
        latencies = []
        try:
            for number, (method, path, body) in enumerate(prepared):
                if number == 1:  # the warm-up is done
                    warmed.wait()
                    start.wait()
                    spans.append(time.perf_counter())
                started = time.perf_counter()
                connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                latencies.append(time.perf_counter() - started)
                if response.status >= 300:
                    raise RuntimeError(f"{method} {path}: HTTP {response.status}")
        except BaseException:
            warmed.abort()
            start.abort()
            raise
        finally:
            connection.close()
        spans.append(time.perf_counter())
        return latencies[1:]  # the first is the warm-up

    spans: list[float] = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        clients = [pool.submit(client, index) for index in range(CONCURRENCY)]
        try:
            warmed.wait()
            settle(server_pid)
            cpu_before = cpu_s(server_pid)
            start.wait()
        except threading.BrokenBarrierError:
            pass  # a client failed: its error is raised below
        latencies = np.concatenate([c.result() for c in clients]) * 1000
    cpu_ms = (cpu_s(server_pid) - cpu_before) * 1000 / (CONCURRENCY * requests)
    return Latencies(float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)),
                     len(latencies) / (max(spans) - min(spans)), cpu_ms)


def drawn(contexts: list[Context], rng: np.random.Generator, weighted: bool = True) -> list[dict]:
    chosen = rng.choice(len(contexts), size=PER_REQUEST, replace=False)
    if not weighted:
        return [contexts[i].model_dump(mode="json") for i in chosen]
    return [contexts[i].weighted(float(rng.uniform(0.1, 10.0))).model_dump(mode="json") for i in chosen]


def measure(database_url: str, workers: int, bodies: list[dict], contexts: list[Context], clients: int,
            requests: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as workdir:
        server = ServiceProcess("tuning-server", ["server", "--database", database_url, "--workers", str(workers)],
                                Path(workdir))
        server.start()
        try:
            return _drive(server, bodies, contexts, clients, requests)
        finally:
            server.stop()


def _drive(server: ServiceProcess, bodies: list[dict], contexts: list[Context], clients: int,
           requests: int) -> dict[str, object]:
    url = server.url
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as api:
        api.put(f"/v1/fabrics/{FABRIC_ID}", json=PRESET.fabric.model_dump(mode="json")).raise_for_status()

    refits_before = refits(url)
    encoded = [json.dumps(body).encode() for body in bodies]  # as an agent sends its spooled batches
    queue = iter(encoded)
    lock = threading.Lock()

    def post_all(_: int) -> None:
        connection = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=300)
        try:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                connection.request("POST", "/v1/measurements", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                if response.status != 202:
                    raise RuntimeError(f"POST /v1/measurements: HTTP {response.status}")
        finally:
            connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post_all, range(clients)))
    posted_at = time.perf_counter()
    ingest = len(bodies) * BATCH / (posted_at - started)

    rng = np.random.default_rng(1)
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as api:
        answer = api.post("/v1/recommend", json={"fabric_id": FABRIC_ID, "contexts": drawn(contexts, rng)})
    lag_s = time.perf_counter() - posted_at
    learner = answer.raise_for_status().json()["learner"]
    took_in = learner["measurements_learned"] >= len(bodies) * BATCH and not learner["behind"]
    deadline = time.monotonic() + 300
    while refits(url) <= refits_before and time.monotonic() < deadline:
        time.sleep(0.1)
    refit_s = time.perf_counter() - posted_at
    time.sleep(1.0)  # let the refit's snapshot settle before timing requests

    def recommend(rng: np.random.Generator) -> Request:
        return "POST", "/v1/recommend", {"fabric_id": FABRIC_ID, "contexts": drawn(contexts, rng)}

    def suggest(rng: np.random.Generator) -> Request:
        return "POST", "/v1/suggest", {"fabric_id": FABRIC_ID, "contexts": drawn(contexts, rng, weighted=False)}

    def suggest_pinned(rng: np.random.Generator) -> Request:
        job = f"job-{int(rng.integers(1 << 30))}"
        return "POST", "/v1/suggest", {"fabric_id": FABRIC_ID, "contexts": drawn(contexts, rng, weighted=False),
                                       "job_id": job, "round": 0}

    def healthz(rng: np.random.Generator) -> Request:
        return "GET", "/healthz", None

    sample = bodies[0]["measurements"]

    def small_batch(rng: np.random.Generator) -> Request:
        """What a node's agent posts each window: a few aggregated measurements."""
        chosen = rng.choice(len(sample), size=SMALL_BATCH, replace=False)
        return "POST", "/v1/measurements", {"fabric_id": FABRIC_ID, "batch_id": f"small-{rng.integers(1 << 62)}",
                                            "measurements": [sample[i] for i in chosen]}

    phases = {name: under_load(url, server.process.pid, call, requests) for name, call in (
        ("healthz", healthz), ("recommend", recommend), ("suggest", suggest), ("suggest pinned", suggest_pinned),
        ("small batches", small_batch))}  # last: its measurements set off refits
    return {"ingest": ingest, "lag_s": lag_s, "took_in": took_in, "refit_s": refit_s, "phases": phases,
            "rss_mib": rss_mib(server.process.pid)}


def main(
    batches: int = typer.Option(63, min=1, help="1,000-measurement batches to ingest (63: ~63,000)"),
    clients: int = typer.Option(4, min=1, help="concurrent ingest clients"),
    requests: int = typer.Option(25, min=1, help="timed requests per client and phase"),
    workers: list[int] = typer.Option([1, 2], min=1, help="server worker processes (repeatable)"),
    database: list[str] = typer.Option(["sqlite", "postgres"], help="sqlite and/or postgres (repeatable)"),
) -> None:
    contexts = fabric_contexts()
    bodies = batch_bodies(batches, contexts)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in database:
            for count in workers:
                url = f"sqlite:///{scratch}/load-{count}.db" if name == "sqlite" else fresh_postgres()
                console.print(f"{name}, {count} worker(s)...")
                results.append((name, count, measure(url, count, bodies, contexts, clients, requests)))

    latency = Table(title=f"Latency under {CONCURRENCY} concurrent clients, {PER_REQUEST} distinct contexts a "
                          f"request (p50 / p99 ms, p99 over the /healthz floor, server CPU a request)")
    for column in ("database", "workers", "/healthz (floor)", "recommend", "suggest", "suggest (job, round)"):
        latency.add_column(column, justify="right")
    for name, count, r in results:
        phases = r["phases"]
        floor = phases["healthz"].p99_ms

        def cell(phase: str) -> str:
            p = phases[phase]
            return f"{p.p50_ms:.1f} / {p.p99_ms:.1f} ({p.p99_ms / floor:.1f}x, {p.cpu_ms:.1f} ms CPU)"

        latency.add_row(name, str(count), f"{phases['healthz'].p50_ms:.1f} / {floor:.1f}", cell("recommend"),
                        cell("suggest"), cell("suggest pinned"))
    console.print(latency)

    ingest = Table(title=f"Ingest ({clients} clients, {batches:,} x {BATCH:,} measurements, {len(contexts)} "
                         f"contexts), learner lag after it, memory")
    for column in ("database", "workers", "measurements/s", "answer after the burst", "took it in",
                   "refit ended", f"{SMALL_BATCH}-measurement batches/s", "RSS (all processes)"):
        ingest.add_column(column, justify="right")
    for name, count, r in results:
        small = r["phases"]["small batches"]
        ingest.add_row(name, str(count), f"{r['ingest']:,.0f}", f"{r['lag_s']:.2f} s", "yes" if r["took_in"] else "no",
                       f"{r['refit_s']:.1f} s", f"{small.per_second:,.0f} (p99 {small.p99_ms:.0f} ms)",
                       f"{r['rss_mib']:.0f} MiB")
    console.print(ingest)


if __name__ == "__main__":
    typer.run(main)

"""Server load: ingest throughput and /v1/recommend latency, on SQLite and PostgreSQL.

A real server process (uvicorn, one worker) on 127.0.0.1 is driven over HTTP:
* ingest: `--clients` threads post 1,000-measurement batches (`--batches` in all);
  throughput = measurements stored / wall time;
* recommend: 20 concurrent clients each ask `--requests` times for a recommendation
  of 100 contexts on a fabric that already holds data; p50 / p99 latency.
Loopback only; every loop is bounded.

Usage: python benchmarks/server_load.py [--batches 60] [--requests 20]
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

from dynamiccl.schemas import Context, Measurement, NcclConfig
from dynamiccl.sim import PRESETS
from dynamiccl.workloads.services import local_server

POSTGRES_SERVER = os.environ.get("DYNAMICCL_BENCH_POSTGRES_SERVER", "postgresql+psycopg://postgres@127.0.0.1:5432")
POSTGRES_URL = f"{POSTGRES_SERVER}/dynamiccl_bench"
PRESET = PRESETS["h100-ib-4n"]
console = Console(width=120)


def contexts(n: int) -> list[Context]:
    sizes = [1024 * 2**i for i in range(21)]
    return [
        Context(collective=c, nbytes=sizes[i % len(sizes)], nranks=32, nnodes=4)
        for i, c in enumerate(["allreduce", "allgather", "reducescatter", "broadcast"] * (n // 4 + 1))
    ][:n]


def batch_body(index: int, calls: list[Context]) -> dict:
    rng = np.random.default_rng(index)
    configs = [NcclConfig(), NcclConfig(algo="ring", proto="simple", nchannels=16)]
    measurements = [
        Measurement(context=calls[i % len(calls)], config=configs[i % 2], latency_us=float(rng.uniform(10, 1000)),
                    count=20, source="bench").model_dump(mode="json", exclude_none=True)
        for i in range(1000)
    ]
    return {"fabric_id": "load", "batch_id": f"load-{index}", "measurements": measurements}


def fresh_postgres() -> str:
    """An empty database of the benchmark's own (scripts/postgres.sh starts the server)."""
    admin = create_engine(f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS dynamiccl_bench WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE dynamiccl_bench"))
    admin.dispose()
    return POSTGRES_URL


def measure(database_url: str, batches: int, clients: int, requests: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir, local_server(database_url, Path(workdir)) as server:
        url = server.url
        with httpx.Client(base_url=url, timeout=60) as http:
            http.put("/v1/fabrics/load", json=PRESET.fabric.model_dump(mode="json")).raise_for_status()
        calls = contexts(100)
        bodies = [batch_body(i, calls) for i in range(batches)]

        def post(body: dict) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                http.post("/v1/measurements", json=body).raise_for_status()

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post, bodies))
        ingest = batches * 1000 / (time.perf_counter() - started)

        time.sleep(2.0)  # let the learner take in the data before timing recommendations
        body = {"fabric_id": "load",
                "contexts": [c.weighted().model_dump(mode="json") for c in calls]}

        def ask(_: int) -> list[float]:
            latencies = []
            with httpx.Client(base_url=url, timeout=60) as http:
                for _ in range(requests):
                    t0 = time.perf_counter()
                    http.post("/v1/recommend", json=body).raise_for_status()
                    latencies.append(time.perf_counter() - t0)
            return latencies

        with ThreadPoolExecutor(20) as pool:
            latencies = np.concatenate(list(pool.map(ask, range(20)))) * 1000
    return {"ingest": ingest, "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
            "n": len(latencies)}


def main(batches: int = 60, clients: int = 4, requests: int = 20) -> None:
    table = Table(title="Server load (one uvicorn worker, loopback)")
    for column in ("database", "ingest (measurements/s)", "recommend p50 (ms)", "recommend p99 (ms)", "requests"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        for name, url in (("SQLite", f"sqlite:///{scratch}/load.db"), ("PostgreSQL", fresh_postgres())):
            r = measure(url, batches, clients, requests)
            table.add_row(name, f"{r['ingest']:,.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}", str(r["n"]))
    console.print(table)


if __name__ == "__main__":
    typer.run(main)

"""Learner lag: how soon an answer takes in what was just posted ("reading your own writes").

A real server process (uvicorn, one worker, SQLite) on 127.0.0.1 is driven
over HTTP by one client that posts and asks at once, the way an online
tuning round does:
* rounds: on a fabric of `--contexts` contexts, each round asks `/v1/suggest`
  for every context, posts one measurement per context (simulated), and at
  once asks `/v1/recommend` for every context. Lag is the time from the
  post's 202 to the recommendation that takes the batch in (the server waits
  for its learner, at most its documented bound, or marks `learner.behind`).
* burst: `--burst` measurements in 1,000-measurement batches posted as fast
  as the server takes them, then a recommendation at once: the same lag, and
  whether that answer waited for the refit of the surrogate (a request that
  brings it many cells it has not seen does, for a bounded time) or when the
  next background refit ended.
Loopback only; every loop is bounded.

Usage: python benchmarks/learner_lag.py [--contexts 500] [--rounds 30] [--burst 60000]
"""

from __future__ import annotations

import re
import tempfile
import time
from itertools import count
from pathlib import Path

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from dynamiccl.client import DynamicclClient
from dynamiccl.nccl.space import candidate_configs
from dynamiccl.schemas import Collective, Context, Measurement, RecommendResponse
from dynamiccl.sim import PRESETS, SimulatedFabric
from dynamiccl.workloads.services import local_server

PRESET = PRESETS["h100-ib-16n"]
FABRIC_ID = "lag"
console = Console(width=120)
_REFITS = re.compile(r"^dynamiccl_refit_duration_seconds_count (\S+)$", re.MULTILINE)


def fabric_contexts(n: int) -> list[Context]:
    collectives = (Collective.allreduce, Collective.allgather, Collective.reducescatter, Collective.broadcast,
                   Collective.reduce)
    shapes = [(c, nodes) for c in collectives for nodes in (1, 2, 4, 8, 16)]
    per_shape = -(-n // len(shapes))
    return [Context(collective=c, nbytes=1024 * round(2 ** (k * 20 / per_shape)), nranks=8 * nodes, nnodes=nodes)
            for c, nodes in shapes for k in range(per_shape)][:n]


def refits(url: str) -> float:
    match = _REFITS.search(httpx.get(f"{url}/metrics", timeout=30).text)
    return float(match.group(1)) if match else 0.0


def ask(client: DynamicclClient, contexts: list[Context]) -> tuple[float, RecommendResponse]:
    started = time.perf_counter()
    answer = client.recommend(FABRIC_ID, [c.weighted() for c in contexts])
    return time.perf_counter() - started, answer


def main(
    contexts: int = typer.Option(500, min=1),
    rounds: int = typer.Option(30, min=1),
    burst: int = typer.Option(60_000, min=1_000),
) -> None:
    calls = fabric_contexts(contexts)
    sim = SimulatedFabric(PRESET, seed=0)
    rng = np.random.default_rng(0)
    batch_ids = count()
    lags, behind, learned_ok = [], 0, 0
    with tempfile.TemporaryDirectory() as workdir, \
            local_server(f"sqlite:///{workdir}/lag.db", Path(workdir)) as server, \
            DynamicclClient(server.url, timeout=120) as client:
        client.put_fabric(FABRIC_ID, sim.fabric)
        posted = 0
        for round_index in range(rounds):
            suggestions = client.suggest(FABRIC_ID, calls, job_id="lag", round=round_index)
            batch = [Measurement(context=s.context, config=s.config, latency_us=sim.run(s.context, s.config),
                                 count=20, source="sim", job_id="lag") for s in suggestions]
            client.post_measurements(FABRIC_ID, f"round-{next(batch_ids)}", batch)
            posted += len(batch)
            lag, answer = ask(client, calls)
            lags.append(lag)
            behind += bool(answer.learner and answer.learner.behind)
            learned_ok += bool(answer.learner and answer.learner.measurements_learned >= posted)

        started = time.perf_counter()
        for _ in range(burst // 1000):
            batch = []
            for _ in range(1000):
                context = calls[int(rng.integers(len(calls)))]
                configs = candidate_configs(sim.fabric, context)
                config = configs[int(rng.integers(len(configs)))]
                batch.append(Measurement(context=context, config=config, latency_us=sim.run(context, config),
                                         count=20, source="sim", job_id="burst"))
            client.post_measurements(FABRIC_ID, f"burst-{next(batch_ids)}", batch)
        posted += (burst // 1000) * 1000
        ingest_s = time.perf_counter() - started
        before = refits(server.url)
        burst_lag, burst_answer = ask(client, calls)
        during = refits(server.url) - before
        if during:
            refit = f"the answer waited for the refit of the surrogate ({during:.0f} ended while it was made)"
        else:
            asked, deadline = time.perf_counter(), time.monotonic() + 300
            while refits(server.url) <= before and time.monotonic() < deadline:
                time.sleep(0.1)
            refit = f"the next background refit of the surrogate ended {time.perf_counter() - asked:.1f} s after that answer"

    table = Table(title=f"Learner lag, one server process, SQLite, {len(calls)} contexts ({PRESET.name})")
    for column in ("case", "answers", "lag p50", "lag p99", "behind", "took the batch in"):
        table.add_column(column, justify="left" if column == "case" else "right")
    p50, p99 = np.percentile(lags, [50, 99])
    table.add_row(f"post a round, recommend at once ({rounds} rounds)", str(rounds), f"{p50 * 1000:.0f} ms",
                  f"{p99 * 1000:.0f} ms", str(behind), f"{learned_ok}/{rounds}")
    took = burst_answer.learner is not None and burst_answer.learner.measurements_learned >= posted
    table.add_row(f"after a {burst:,}-measurement burst (posted in {ingest_s:.1f} s)", "1",
                  f"{burst_lag * 1000:.0f} ms", "", str(int(bool(burst_answer.learner and burst_answer.learner.behind))),
                  "yes" if took else "no")
    table.caption = refit
    console.print(table)


if __name__ == "__main__":
    typer.run(main)

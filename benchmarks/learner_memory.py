"""Learner memory: what the server holds for a fabric as its history grows, and for many fabrics.

In one process, a SQLite store is filled through `Store.add_batch` and the server's learner
takes it in as a server does (`FabricKnowledge`: a request's catch-up folds the new rows in,
then the refit the worker thread would run):
* one fabric: 1,000,000 measurements (`--measurements`) of 176 contexts (4 collectives on
  1 to 4 nodes, 4 KiB to 4 GiB in 4x steps) and every candidate config, with the learner's
  resident memory after 10%, 50% and 100% of them;
* many fabrics: `--fabrics` fabrics of the seven simulated presets' hardware, 10,000
  measurements each.
Memory is the process's resident set above what it held before the learner was built (the
store's own cache included), after a garbage collection. For many fabrics the times are the
last fabric's.
Latencies come from `dynamiccl.sim`. Every loop is bounded.

Usage: python benchmarks/learner_memory.py [--measurements 1000000] [--fabrics 100]
"""

from __future__ import annotations

import gc
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dynamiccl.nccl.space import candidate_configs
from dynamiccl.schemas import Collective, Context, Measurement
from dynamiccl.server.learner.knowledge import FabricKnowledge
from dynamiccl.server.storage import Store, open_store
from dynamiccl.sim import PRESETS, SimulatedFabric

BATCH = 10_000
console = Console(width=120)


def rss_mib() -> float:
    gc.collect()
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE).group(1)) / 1024


def contexts_of(sim: SimulatedFabric) -> list[Context]:
    gpus, nodes = sim.fabric.gpus_per_node, (1, 2, 3, 4)
    collectives = (Collective.allreduce, Collective.allgather, Collective.reducescatter, Collective.broadcast)
    return [Context(collective=c, nbytes=4096 * 4**k, nranks=gpus * n, nnodes=n)
            for c in collectives for n in nodes for k in range(11)]


def fill(store: Store, fabric_id: str, sim: SimulatedFabric, count: int, rng: np.random.Generator,
         start: int = 0) -> None:
    """`count` measurements of random (context, candidate config) pairs, from 16 jobs."""
    contexts = contexts_of(sim)
    for first in range(start, start + count, BATCH):
        batch = []
        for i in range(first, min(first + BATCH, start + count)):
            context = contexts[int(rng.integers(len(contexts)))]
            configs = candidate_configs(sim.fabric, context)
            config = configs[int(rng.integers(len(configs)))]
            batch.append(Measurement(context=context, config=config, latency_us=sim.run(context, config),
                                     count=20, source="sim", job_id=f"job-{i % 16}"))
        store.add_batch(fabric_id, f"batch-{first}", batch)


def take_in(knowledge: FabricKnowledge, store: Store, donors: list[FabricKnowledge]) -> tuple[float, float]:
    """Seconds to fold the new rows in (a request's catch-up) and to refit (the worker's job)."""
    started = time.perf_counter()
    knowledge.catch_up(store, store.last_measurement_id(knowledge.fabric_id), timeout_s=600)
    caught_up = time.perf_counter()
    knowledge.refresh(store, donors)
    return caught_up - started, time.perf_counter() - caught_up


def one_fabric(total: int) -> list[tuple[str, ...]]:
    rows = []
    sim, rng = SimulatedFabric(PRESETS["h100-ib-4n"], seed=0), np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        store = open_store(f"sqlite:///{scratch}/memory.db")
        store.put_fabric("big", sim.fabric)
        baseline = rss_mib()
        knowledge = FabricKnowledge("big", sim.fabric)
        done = 0
        with Progress(console=console) as progress:
            task = progress.add_task("one fabric", total=total)
            for share in (0.1, 0.5, 1.0):
                target = int(total * share)
                fill(store, "big", sim, target - done, rng, start=done)
                progress.update(task, completed=target)
                new, done = target - done, target
                catch_up_s, refit_s = take_in(knowledge, store, [])
                rows.append(("1 fabric", f"{done:,}", f"{new:,}", f"{len(knowledge.snapshot.cells):,}",
                             f"{rss_mib() - baseline:.0f} MiB", f"{catch_up_s:.1f} s", f"{refit_s:.1f} s"))
        store.close()
    return rows


def many_fabrics(fabrics: int, per_fabric: int) -> tuple[str, ...]:
    """Fabrics of one preset's hardware are each other's donors, as the server pairs them."""
    presets = list(PRESETS.values())
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as scratch:
        store = open_store(f"sqlite:///{scratch}/fleet.db")
        sims = {f"fabric-{i:03d}": SimulatedFabric(presets[i % len(presets)], seed=i) for i in range(fabrics)}
        with Progress(console=console) as progress:
            task = progress.add_task("many fabrics", total=fabrics)
            for fabric_id, sim in sims.items():
                store.put_fabric(fabric_id, sim.fabric)
                fill(store, fabric_id, sim, per_fabric, rng)
                progress.advance(task)
        baseline = rss_mib()
        knowledge = {fabric_id: FabricKnowledge(fabric_id, sim.fabric) for fabric_id, sim in sims.items()}
        catch_up_s = refit_s = 0.0
        for fabric_id, fabric in knowledge.items():
            donors = [other for other in knowledge.values() if other is not fabric and other.signature == fabric.signature]
            catch_up_s, refit_s = take_in(fabric, store, donors)
        cells = sum(len(fabric.snapshot.cells) for fabric in knowledge.values())
        row = (f"{fabrics} fabrics", f"{fabrics * per_fabric:,}", f"{per_fabric:,} each", f"{cells:,}",
               f"{rss_mib() - baseline:.0f} MiB", f"{catch_up_s:.1f} s", f"{refit_s:.1f} s")
        store.close()
    return row


def main(
    measurements: int = typer.Option(1_000_000, min=BATCH),
    fabrics: int = typer.Option(100, min=1),
    per_fabric: int = typer.Option(10_000, min=BATCH),
) -> None:
    table = Table(title="Learner memory (resident, above the store's), and the time to take in what is new")
    for column in ("case", "measurements", "new", "cells", "learner memory", "catch-up", "refit"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for row in [*one_fabric(measurements), many_fabrics(fabrics, per_fabric)]:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    typer.run(main)

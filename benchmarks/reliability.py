"""Reliability and security: poisoned telemetry, and a bounded soak with faults and hostile input.

1. Poisoning (in-process learner over a SQLite store, simulated fabric): a fleet
   of `--agents` node agents tunes every context round after round (contexts go
   to the honest agents in rotation; each posts under its own name). Malicious
   agents report, on every context and every round, the slowest valid config as
   10x faster than it truly is. After `--rounds` rounds a launcher asks for the
   recommendation; slowdown = true time of the recommended config / true time
   of NCCL's default. Also counted: how often the honest agents were handed the
   poisoned config by /v1/suggest (the cost of checking a claim). The same
   fleet also runs against the coordinate-descent baseline, which trusts
   every sample: what the attack does where nothing defends against it.
2. Soak (a real server process on loopback, SQLite): `--soak-agents` agents
   post batches (each keeps a batch until it is acknowledged, resending it with
   the same id, as the node agent's spool does) and `--launchers` launchers ask
   for recommendations, for `--soak-seconds`. Meanwhile the server is killed
   with SIGKILL and restarted `--kills` times, and malformed requests are sent.
   Per interval: requests, p99 latency, server RSS. At the end every
   acknowledged measurement must be in the database.

Usage: python benchmarks/reliability.py [--rounds 20] [--soak-seconds 180]
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from dynamiccl.nccl.space import candidate_configs
from dynamiccl.schemas import Context, Fabric, Measurement, NcclConfig
from dynamiccl.server.learner import CoordinateDescentTuner, Tuner, respond
from dynamiccl.server.learner.tuner import DynamicclTuner
from dynamiccl.server.storage import SqlStore
from dynamiccl.sim import PRESETS, SimulatedFabric
from dynamiccl.workloads.services import local_server

console = Console(width=160)
COLLECTIVES = ("allreduce", "allgather", "reducescatter", "broadcast")
LIE_FACTOR = 10.0


# ---------------------------------------------------------------------------------------------
# 1. Poisoned telemetry


@dataclass(frozen=True)
class PoisonResult:
    learner: str
    agents: int
    malicious: int
    worst_slowdown: float  # max over contexts of recommended / default (true times)
    worst_env_slowdown: float  # the same for the process-wide env, as NCCL applies it
    speedup: float  # geometric mean of default / recommended
    poisoned_recommended: int  # contexts whose recommendation is the poisoned config
    poisoned_suggested: float  # share of honest suggestions that were the poisoned config
    contexts: int


def poisoning_contexts(preset_name: str, sizes: int) -> list[Context]:
    preset = PRESETS[preset_name]
    nodes = max(preset.node_counts)
    gpus = preset.fabric.gpus_per_node
    return [Context(collective=c, nbytes=1024 * 4**i, nranks=nodes * gpus, nnodes=nodes)
            for c in COLLECTIVES for i in range(sizes)]


def _settle(tuner: Tuner, fabric_id: str, fabric: Fabric) -> None:
    """Wait until DynamICCL's learner has taken in what was stored (baselines learn in observe)."""
    if isinstance(tuner, DynamicclTuner):
        tuner.knowledge.get(fabric_id, fabric)
        tuner.knowledge.wait_idle(timeout=60)


def run_poisoning(
    preset_name: str, agents: int, malicious: int, rounds: int, sizes: int, seed: int, workdir: str,
    learner: str = "DynamICCL",
) -> PoisonResult:
    """One fleet of `agents`, `malicious` of them lying; see the module's docstring. `learner`
    "coordinate descent" runs the same fleet against that baseline (lowest median per context,
    every sample trusted), to show what the attack does where nothing defends against it."""
    preset = PRESETS[preset_name]
    truth = SimulatedFabric(preset, seed=seed)
    sim = SimulatedFabric(preset, seed=seed + 1)
    fabric = sim.fabric
    contexts = poisoning_contexts(preset_name, sizes)
    slowest = [max(candidate_configs(fabric, c), key=lambda k, c=c: truth.true_latency_us(c, k)) for c in contexts]
    honest = [f"agent-{k}" for k in range(agents - malicious)]
    liars = [f"liar-{k}" for k in range(malicious)]
    store = SqlStore(f"sqlite:///{workdir}/poison-{learner.replace(' ', '-')}-{agents}-{malicious}-{seed}.db")
    tuner: Tuner = DynamicclTuner(store) if learner == "DynamICCL" else CoordinateDescentTuner()
    fabric_id = "fleet"
    store.put_fabric(fabric_id, fabric)
    poisoned_suggested = suggested = 0
    try:
        for round_index in range(rounds):
            _settle(tuner, fabric_id, fabric)
            picks = tuner.suggest(fabric_id, fabric, contexts, seed=round_index)
            batches: dict[str, list[Measurement]] = {name: [] for name in honest + liars}
            for i, (context, pick) in enumerate(zip(contexts, picks)):
                agent = honest[(i + round_index) % len(honest)]
                suggested += 1
                poisoned_suggested += pick.config == slowest[i]
                batches[agent].append(Measurement(
                    context=context, config=pick.config, latency_us=sim.run(context, pick.config, 20),
                    count=20, source="sim", job_id=f"job-{agent}"))
                for liar in liars:
                    fake = truth.true_latency_us(context, slowest[i]) / LIE_FACTOR
                    batches[liar] += [Measurement(context=context, config=slowest[i], latency_us=fake, count=20,
                                                  source="sim", job_id=f"job-{liar}")] * 3
            for name, batch in batches.items():
                store.add_batch(fabric_id, f"{name}-{round_index}", batch, name)
            tuner.observe(fabric_id, fabric, [m for batch in batches.values() for m in batch])
        _settle(tuner, fabric_id, fabric)
        answer = respond([c.weighted() for c in contexts], tuner.recommend(fabric_id, fabric, contexts))
    finally:
        tuner.close()
        store.close()
    recommended = np.array([truth.true_latency_us(r.context, r.config) for r in answer.recommendations])
    default = np.array([truth.true_latency_us(c, NcclConfig()) for c in contexts])
    return PoisonResult(
        learner=learner, agents=agents, malicious=malicious,
        worst_slowdown=float(np.max(recommended / default)),
        worst_env_slowdown=float(max(truth.latency_under_env(c, answer.env) / d for c, d in zip(contexts, default))),
        speedup=float(np.exp(np.mean(np.log(default / recommended)))),
        poisoned_recommended=sum(r.config == k for r, k in zip(answer.recommendations, slowest)),
        poisoned_suggested=poisoned_suggested / suggested,
        contexts=len(contexts),
    )


def poisoning_table(results: list[PoisonResult], preset: str, rounds: int) -> Table:
    table = Table(title=f"Poisoned telemetry on {preset}, {rounds} rounds "
                        f"(liars report the slowest valid config {LIE_FACTOR:g}x faster, every context)")
    for column in ("learner", "agents", "malicious", "contexts", "worst slowdown", "worst under env", "speedup vs default",
                   "poisoned config recommended", "honest suggestions of it"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r.learner, str(r.agents), str(r.malicious), str(r.contexts), f"{r.worst_slowdown:.3f}x",
                      f"{r.worst_env_slowdown:.3f}x",
                      f"{r.speedup:.3f}", str(r.poisoned_recommended), f"{r.poisoned_suggested:.1%}")
    return table


# ---------------------------------------------------------------------------------------------
# 2. Soak


@dataclass
class SoakLog:
    """What the soak saw; appended to from several threads (list.append is atomic)."""

    started: float = field(default_factory=time.monotonic)
    requests: list[tuple[float, str, float]] = field(default_factory=list)  # (t, kind, seconds)
    errors: list[str] = field(default_factory=list)  # answers that should not happen
    retries: int = 0  # transport failures (server down) retried until acknowledged
    bad_inputs: int = 0
    faults_injected: int = 0
    faults_survived: int = 0  # the server was back, answering, after the fault
    restart_s: list[float] = field(default_factory=list)  # kill to answering again
    rss: list[tuple[float, float]] = field(default_factory=list)
    acknowledged: dict[str, int] = field(default_factory=dict)  # batch id -> measurements

    def record(self, kind: str, seconds: float) -> None:
        self.requests.append((time.monotonic() - self.started, kind, seconds))


BAD_BODIES: list[tuple[str, str, bytes]] = [
    ("POST", "/v1/measurements", b"{not json"),
    ("POST", "/v1/measurements", b'{"fabric_id": "soak", "batch_id": "x", "measurements": [{"latency_us": NaN}]}'),
    ("POST", "/v1/suggest", b"[" * 5000 + b"]" * 5000),
    ("POST", "/v1/recommend", json.dumps({"fabric_id": "soak", "contexts": [{"collective": "allsum"}]}).encode()),
    ("POST", "/v1/measurements", json.dumps({"fabric_id": "soak", "batch_id": "big",
                                             "measurements": [{}] * 10_001}).encode()),
    ("PUT", "/v1/fabrics/bad%20id", b'{"gpu": "H100"}'),
    ("POST", "/v1/suggest", b'{"fabric_id": "soak", "contexts": [{"collective": "allreduce", "nbytes": '
                            + b"9" * 5000 + b', "nranks": 8, "nnodes": 1}]}'),
]


def _soak_contexts(fabric_nodes: int, gpus: int) -> list[Context]:
    return [Context(collective=c, nbytes=1024 * 4**i, nranks=fabric_nodes * gpus, nnodes=fabric_nodes)
            for c in COLLECTIVES for i in range(8)]


def run_soak(
    seconds: float, agents: int, launchers: int, kills: int, interval_s: float, workdir: str,
    on_interval: Callable[[str], None] = lambda line: None,
) -> tuple[SoakLog, int, list[dict]]:
    """Returns the log, the measurements the database holds at the end, and per-interval rows."""
    preset = PRESETS["h100-ib-2n"]
    sim = SimulatedFabric(preset, seed=3)
    contexts = _soak_contexts(2, preset.fabric.gpus_per_node)
    log = SoakLog()
    stop = threading.Event()
    with local_server(f"sqlite:///{workdir}/soak.db", Path(workdir)) as server:
        httpx.put(f"{server.url}/v1/fabrics/soak", json=sim.fabric.model_dump(mode="json"), timeout=30)

        def call(kind: str, method: str, path: str, body: dict, ok: int) -> httpx.Response | None:
            """One request, resent (same body, same batch id) while the server is down."""
            while not stop.is_set() or kind == "post":
                started = time.perf_counter()
                try:
                    response = httpx.request(method, server.url + path, json=body, timeout=30)
                except httpx.TransportError:
                    log.retries += 1
                    time.sleep(0.2)
                    continue
                log.record(kind, time.perf_counter() - started)
                if response.status_code == ok:
                    return response
                if response.status_code in (429, 503):
                    log.retries += 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                    continue
                log.errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
                return None
            return None

        def agent(index: int) -> None:
            rng = random.Random(index)
            sequence = 0
            while not stop.is_set():
                batch_id = f"agent{index}-{sequence:06d}"
                measurements = []
                for context in rng.sample(contexts, 8):
                    config = rng.choice(candidate_configs(sim.fabric, context))
                    measurements.append(Measurement(
                        context=context, config=config, latency_us=sim.run(context, config, 20), count=20,
                        source="sim", job_id=f"soak-job-{index}").model_dump(mode="json", exclude_none=True))
                response = call("post", "POST", "/v1/measurements",
                                {"fabric_id": "soak", "batch_id": batch_id, "measurements": measurements}, 202)
                if response is not None and not response.json()["duplicate_batch"]:
                    log.acknowledged[batch_id] = response.json()["accepted"]
                elif response is not None:  # resent after an acknowledgement that was lost in a kill
                    log.acknowledged.setdefault(batch_id, len(measurements))
                sequence += 1
                time.sleep(rng.uniform(0.05, 0.15))

        def launcher(index: int) -> None:
            rng = random.Random(1000 + index)
            while not stop.is_set():
                chosen = rng.sample(contexts, 12)
                call("recommend", "POST", "/v1/recommend",
                     {"fabric_id": "soak", "contexts": [c.weighted().model_dump(mode="json") for c in chosen]}, 200)
                time.sleep(rng.uniform(0.1, 0.3))

        def hostile() -> None:
            rng = random.Random(7)
            while not stop.is_set():
                method, path, body = rng.choice(BAD_BODIES)
                try:
                    response = httpx.request(method, server.url + path, content=body,
                                             headers={"Content-Type": "application/json"}, timeout=30)
                except httpx.TransportError:
                    time.sleep(0.2)
                    continue
                log.bad_inputs += 1
                if not 400 <= response.status_code < 500 or "Traceback" in response.text:
                    log.errors.append(f"bad input {path}: {response.status_code}")
                time.sleep(0.5)

        threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(agents)]
        threads += [threading.Thread(target=launcher, args=(i,), daemon=True) for i in range(launchers)]
        threads += [threading.Thread(target=hostile, daemon=True)]
        for thread in threads:
            thread.start()
        kill_times = [seconds * (k + 1) / (kills + 1) for k in range(kills)]
        rows: list[dict] = []
        next_row = interval_s
        while (now := time.monotonic() - log.started) < seconds:
            if kill_times and now >= kill_times[0]:
                kill_times.pop(0)
                server.kill()
                log.faults_injected += 1
                server.start()
                log.faults_survived += 1
                log.restart_s.append(time.monotonic() - log.started - now)
            log.rss.append((now, server.rss_mib()))
            if now >= next_row:
                rows.append(_interval_row(log, next_row - interval_s, next_row))
                on_interval(_format_row(rows[-1]))
                next_row += interval_s
            time.sleep(0.25)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        rows.append(_interval_row(log, next_row - interval_s, seconds))
        on_interval(_format_row(rows[-1]))
        status = httpx.get(f"{server.url}/v1/fabrics/soak", timeout=30).json()
    return log, status["measurements"], rows


def _interval_row(log: SoakLog, start: float, end: float) -> dict:
    within = [(kind, s) for t, kind, s in list(log.requests) if start <= t < end]
    rss = [m for t, m in list(log.rss) if start <= t < end and not math.isnan(m)]

    def p99(kind: str) -> float:
        values = [s for k, s in within if k == kind]
        return float(np.percentile(values, 99)) * 1000 if values else math.nan

    return {"interval": f"{start:.0f}-{end:.0f}s", "requests": len(within), "p99 post ms": p99("post"),
            "p99 recommend ms": p99("recommend"), "rss MiB": max(rss) if rss else math.nan}


def _format_row(row: dict) -> str:
    return "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


def main(
    preset: str = typer.Option("h100-ib-2n"),
    agents: int = typer.Option(10, min=2, help="fleet size of the poisoning experiment"),
    rounds: int = typer.Option(20, min=1),
    sizes: int = typer.Option(11, min=1, max=16, help="message sizes per collective (1 KiB x4 steps)"),
    seed: int = typer.Option(0),
    soak_seconds: float = typer.Option(180.0, min=10, max=300),
    soak_agents: int = typer.Option(8, min=1),
    launchers: int = typer.Option(4, min=1),
    kills: int = typer.Option(2, min=0),
    interval: float = typer.Option(30.0, min=1),
) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        results = []
        for learner in ("DynamICCL", "coordinate descent"):
            for malicious in (0, 1, 2):
                console.print(f"poisoning: {learner}, {agents} agents, {malicious} malicious ...")
                results.append(run_poisoning(preset, agents, malicious, rounds, sizes, seed, workdir, learner))
        console.print(poisoning_table(results, preset, rounds))

        console.print(f"soak: {soak_agents} agents, {launchers} launchers, {soak_seconds:.0f}s, {kills} kill(s)")
        log, stored, rows = run_soak(soak_seconds, soak_agents, launchers, kills, interval, workdir,
                                     on_interval=console.print)
    interval_table = Table(title="Soak, per interval")
    for column in rows[0]:
        interval_table.add_column(column, justify="right")
    for row in rows:
        interval_table.add_row(*(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(interval_table)
    console.print(summary_table(log, stored))


def data_lost(log: SoakLog, stored: int) -> int:
    """Acknowledged measurements missing from the database (negative: some stored twice)."""
    return sum(log.acknowledged.values()) - stored


def summary_table(log: SoakLog, stored: int) -> Table:
    table = Table(title="Reliability")
    table.add_column("figure")
    table.add_column("value", justify="right")
    served = len(log.requests) + log.bad_inputs
    for name, value in [
        ("requests served", served), ("errors", len(log.errors)),
        ("faults injected (SIGKILL + restart)", log.faults_injected), ("faults survived", log.faults_survived),
        ("server down per restart (s)", ", ".join(f"{s:.1f}" for s in log.restart_s) or "-"),
        ("requests retried (server down / 503)", log.retries), ("bad inputs tried", log.bad_inputs),
        ("batches acknowledged", len(log.acknowledged)), ("measurements acknowledged", sum(log.acknowledged.values())),
        ("measurements stored", stored), ("data lost", data_lost(log, stored)),
    ]:
        table.add_row(name, str(value))
    return table


if __name__ == "__main__":
    typer.run(main)

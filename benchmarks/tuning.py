"""Tuning quality: the closed loop on simulated fabrics, strategies side by side.

Each round every strategy is asked what to run for every context, runs it on
the simulated fabric (`--calls` calls averaged, with the simulator's noise
and stragglers), and reports the measurement. After `--rounds` rounds it is
asked for its recommendation, which is scored against the simulator's true
(noiseless) latencies. DynamICCL runs as a real server process and is driven
through the HTTP API with the project's client; the baselines run in-process
behind the same `Tuner` interface. Before each DynamICCL round the benchmark
waits until the server's learner has taken in the last round (in a real job
rounds are training steps apart, seconds, far longer than a refit). Its
measurements are posted by `--agents` simulated node agents, each with a token
of its own (contexts go to the agents in rotation, round after round), as a
fleet reports: the server only recommends what more than one source backs.

Figures per fabric (geometric means over contexts unless said otherwise):
  % oracle      oracle time / recommended time
  speedup       default time / recommended time
  headroom      default time / oracle time (the most any tuner can gain)
  worst         the lowest oracle / recommended over contexts
  regress       contexts where the recommendation is > 2% slower than the default
  regret        suggested time / oracle time over all rounds, minus 1
  online        time the default would have spent / time spent, summed over all rounds
  invalid       suggested or recommended configs the fabric cannot run
env and rules rows score the rendered process-wide `env` and the per-size
`tuner_config` as NCCL would apply them.

Usage: python benchmarks/tuning.py [--presets h100-ib-2n,a100-ib-2n] [--rounds 30]
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dynamiccl.client import DynamicclClient
from dynamiccl.nccl.space import is_valid
from dynamiccl.schemas import (
    Collective,
    Context,
    Measurement,
    NcclConfig,
    RecommendResponse,
)
from dynamiccl.server.learner import CoordinateDescentTuner, ExhaustiveSweepTuner, NcclDefaultTuner, Tuner, respond
from dynamiccl.sim import PRESETS, Preset, SimulatedFabric
from dynamiccl.workloads.services import local_server

COLLECTIVES = (Collective.allreduce, Collective.allgather, Collective.reducescatter, Collective.broadcast)
SIZES = tuple(1024 * 4**i for i in range(11))  # 1 KiB .. 1 GiB
FABRIC_ID = "bench"
console = Console(width=150)


def contexts_for(preset: Preset) -> list[Context]:
    gpus = preset.fabric.gpus_per_node
    return [
        Context(collective=c, nbytes=size, nranks=nodes * gpus, nnodes=nodes)
        for nodes in preset.node_counts
        for c in COLLECTIVES
        for size in SIZES
    ]


class Strategy:
    """One tuner in the loop: asked, run, told."""

    name: str

    def suggest(self, contexts: list[Context], round_index: int) -> list[NcclConfig]: ...
    def report(self, measurements: list[Measurement]) -> None: ...
    def recommend(self, contexts: list[Context]) -> RecommendResponse: ...


class InProcess(Strategy):
    def __init__(self, name: str, tuner: Tuner, sim: SimulatedFabric) -> None:
        self.name, self.tuner, self.fabric = name, tuner, sim.fabric

    def suggest(self, contexts: list[Context], round_index: int) -> list[NcclConfig]:
        return [p.config for p in self.tuner.suggest(FABRIC_ID, self.fabric, contexts, seed=round_index)]

    def report(self, measurements: list[Measurement]) -> None:
        self.tuner.observe(FABRIC_ID, self.fabric, measurements)

    def recommend(self, contexts: list[Context]) -> RecommendResponse:
        return respond([c.weighted() for c in contexts], self.tuner.recommend(FABRIC_ID, self.fabric, contexts))


def agent_tokens(agents: int) -> dict[str, str]:
    return {f"agent-{k}": f"bench-token-{k}" for k in range(agents)}


class OverHttp(Strategy):
    """DynamICCL through its public API, on a server process of its own, fed by a fleet of agents."""

    name = "DynamICCL"

    def __init__(self, base_url: str, sim: SimulatedFabric, fabric_id: str, tokens: dict[str, str]) -> None:
        self.agents = [DynamicclClient(base_url, token=token, timeout=60) for token in tokens.values()]
        self.api = self.agents[0]
        self.base_url, self.fabric_id = base_url, fabric_id
        self._headers = {"Authorization": f"Bearer {next(iter(tokens.values()))}"}
        self.api.put_fabric(fabric_id, sim.fabric)
        self._batches = count()
        self._round = 0
        self._sent = 0

    def suggest(self, contexts: list[Context], round_index: int) -> list[NcclConfig]:
        self._wait_learned()
        suggestions = self.api.suggest(self.fabric_id, contexts, job_id="bench", round=round_index)
        return [s.config for s in suggestions]

    def report(self, measurements: list[Measurement]) -> None:
        for k, agent in enumerate(self.agents):
            share = [m for i, m in enumerate(measurements) if (i + self._round) % len(self.agents) == k]
            if share:
                agent.post_measurements(self.fabric_id, f"batch-{next(self._batches)}", share)
        self._round += 1
        self._sent += len(measurements)

    def recommend(self, contexts: list[Context]) -> RecommendResponse:
        self._wait_learned()
        return self.api.recommend(self.fabric_id, [c.weighted() for c in contexts])

    def _wait_learned(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = httpx.get(f"{self.base_url}/v1/fabrics/{self.fabric_id}", headers=self._headers, timeout=30).json()
            if status.get("learner", {}).get("measurements_learned", 0) >= self._sent:
                return
            time.sleep(0.05)
        raise TimeoutError("the server's learner did not catch up")


@dataclass
class LoopResult:
    name: str
    spent_us: float = 0.0
    default_us: float = 0.0
    regret_logs: list[float] = field(default_factory=list)
    invalid: int = 0
    recommendation: RecommendResponse | None = None


def run_loop(
    strategy: Strategy, sim: SimulatedFabric, contexts: list[Context], rounds: int, calls: int,
    oracle: list[float], default: list[float], progress: Progress, task,
) -> LoopResult:
    result = LoopResult(strategy.name)
    for round_index in range(rounds):
        configs = strategy.suggest(contexts, round_index)
        measurements = []
        for i, (context, config) in enumerate(zip(contexts, configs)):
            if not is_valid(sim.fabric, context, config):
                result.invalid += 1
                config = NcclConfig()
            true_us = sim.true_latency_us(context, config)
            result.spent_us += true_us
            result.default_us += default[i]
            result.regret_logs.append(math.log(true_us / oracle[i]))
            measurements.append(
                Measurement(context=context, config=config, latency_us=sim.run(context, config, calls),
                            count=calls, source="sim", job_id="bench")
            )
        strategy.report(measurements)
        progress.advance(task)
    result.recommendation = strategy.recommend(contexts)
    result.invalid += sum(
        not is_valid(sim.fabric, r.context, r.config) for r in result.recommendation.recommendations
    )
    return result


@dataclass(frozen=True)
class Scores:
    of_oracle: float
    speedup: float
    worst: float
    regressions: int


def score(times: Sequence[float], oracle: Sequence[float], default: Sequence[float]) -> Scores:
    t, o, d = np.asarray(times), np.asarray(oracle), np.asarray(default)
    return Scores(
        of_oracle=float(np.exp(np.mean(np.log(o / t)))),
        speedup=float(np.exp(np.mean(np.log(d / t)))),
        worst=float(np.min(o / t)),
        regressions=int(np.sum(t > 1.02 * d)),
    )


def main(
    presets: str = typer.Option(",".join(PRESETS), help="comma-separated preset names"),
    rounds: int = typer.Option(30, min=1),
    calls: int = typer.Option(20, min=1, help="calls averaged per measurement"),
    seed: int = typer.Option(0),
    agents: int = typer.Option(4, min=1, help="simulated node agents posting DynamICCL's measurements"),
) -> None:
    table = Table(title=f"Tuning quality after {rounds} rounds ({calls} calls a measurement)")
    for column in ("fabric", "strategy", "% oracle", "speedup", "headroom", "worst", "regress",
                   "regret", "online", "invalid"):
        table.add_column(column, justify="left" if column in ("fabric", "strategy") else "right")
    tokens = agent_tokens(agents)
    os.environ["DYNAMICCL_TOKENS"] = ",".join(f"{name}:{token}" for name, token in tokens.items())
    with tempfile.TemporaryDirectory() as workdir, \
            local_server(f"sqlite:///{workdir}/bench.db", Path(workdir)) as server:
        for name in presets.split(","):
            _bench_preset(PRESETS[name], server.url, rounds, calls, seed, tokens, table)
    console.print(table)


def _bench_preset(
    preset: Preset, url: str, rounds: int, calls: int, seed: int, tokens: dict[str, str], table: Table
) -> None:
    contexts = contexts_for(preset)
    truth = SimulatedFabric(preset, seed=seed)
    oracle = [truth.oracle(c)[1] for c in contexts]
    default = [truth.true_latency_us(c, NcclConfig()) for c in contexts]
    headroom = float(np.exp(np.mean(np.log(np.asarray(default) / np.asarray(oracle)))))
    strategies: list[Strategy] = [
        InProcess("NCCL default", NcclDefaultTuner(), truth),
        InProcess("exhaustive sweep", ExhaustiveSweepTuner(), truth),
        InProcess("coordinate descent", CoordinateDescentTuner(), truth),
        OverHttp(url, truth, f"{preset.name}-{seed}", tokens),
    ]
    with Progress(console=console, transient=True) as progress:
        for strategy in strategies:
            task = progress.add_task(f"{preset.name}: {strategy.name}", total=rounds)
            sim = SimulatedFabric(preset, seed=seed + 1)  # same fabric, its own noise stream
            result = run_loop(strategy, sim, contexts, rounds, calls, oracle, default, progress, task)
            _add_rows(table, preset, result, contexts, truth, oracle, default, headroom)
    table.add_row(preset.name, "oracle", "100.0%", f"{headroom:.3f}", f"{headroom:.3f}", "1.000", "0",
                  "", "", "0", end_section=True)


def _add_rows(table, preset, result: LoopResult, contexts, truth, oracle, default, headroom) -> None:
    recommendation = result.recommendation
    rows = [(result.name, [truth.true_latency_us(r.context, r.config) for r in recommendation.recommendations])]
    if result.name == "DynamICCL":
        rows.append(("  env applied", [truth.latency_under_env(c, recommendation.env) for c in contexts]))
        rows.append(("  rules applied", [truth.latency_under_rules(c, recommendation.tuner_config) for c in contexts]))
    regret = math.expm1(float(np.mean(result.regret_logs)))
    online = result.default_us / result.spent_us
    for i, (name, times) in enumerate(rows):
        s = score(times, oracle, default)
        loop = (f"{regret:.1%}", f"{online:.3f}", str(result.invalid)) if i == 0 else ("", "", "")
        table.add_row(preset.name, name, f"{s.of_oracle:.1%}", f"{s.speedup:.3f}", f"{headroom:.3f}",
                      f"{s.worst:.3f}", str(s.regressions), *loop)


if __name__ == "__main__":
    typer.run(main)

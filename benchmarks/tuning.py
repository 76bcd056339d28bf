"""Tuning quality: the closed loop on simulated clusters, scored as the job runs it.

Each round every strategy is asked what to run for every context, runs it on
the simulated cluster (`--calls` calls averaged, with the simulator's noise
and stragglers), and reports the measurement. After `--rounds` rounds it is
asked for its recommendation, which is scored against the simulator's true
(noiseless) latencies three ways: the per-context recommendation, the
`tuner_config` rules as DynamICCL's tuner plugin applies them (a `--mode
plugin` job: what the job runs), and the `env` as NCCL applies it (a `--mode
env` job). The cluster's own NCCL decides whatever the rules and env leave to
it, and on the random clusters that NCCL need not pick what the cost model the
server knows predicts.

DynamICCL runs as a real server process, driven through its public API with
the project's client, in four ways (`--modes`):
  one source    one agent posts everything (one job, an open API, a fleet sharing one token)
  four sources  four agents, a token each, post the contexts in rotation round after round
  no wait       one agent that asks for suggestions and the recommendation right after it posts
  liar          four tokens, one of them lying plausibly: every round it claims, for every
                context, that a truly slower config ran 15% faster than the default
In the wait modes the benchmark waits until the server's learner has taken in
the last round before asking (rounds are training steps apart in a real job).
After the one- and four-source runs a new fabric id with the same hardware is
tuned for 3 rounds and its recommendation scored ("twin after 3").

Clusters: the presets (`--presets`) and `--random` seeded random clusters
(`dynamiccl.sim.clusters`: hardware, size and every effect drawn, up to 2-3x
off NCCL's model, on about half an NCCL that picks by other constants), which
nothing in the learner was tuned on. The baselines run in-process behind the
same `Tuner` interface on the presets, one source each, judged by the same guard.

Figures (geometric means over contexts unless said otherwise):
  % oracle   oracle time / time run          speedup   default time / time run
  headroom   default time / oracle time      worst     lowest oracle / time run over contexts
  slower     calls > 2% slower than NCCL's default (true times)
  regret     suggested time / oracle time over all rounds, minus 1 (includes the headroom left
             while the default is measured first)
  explore    exploration cost: time spent beyond the default's on calls suggested slower than it,
             over the default's time, all rounds
  online     time the default would have spent / time spent, over all rounds
  liar       contexts whose recommendation is the liar's config
  example plugin slower   calls slower if the same rules were loaded into NCCL's example plugin
             (one channel for every call no rule matches: why `dynamiccl launch` will not)

Usage: python benchmarks/tuning.py [--presets h100-ib-2n] [--random 20] [--rounds 30]
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

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dynamiccl.client import DynamicclClient
from dynamiccl.nccl.space import candidate_configs, is_valid
from dynamiccl.schemas import Collective, Context, Measurement, NcclConfig, RecommendResponse
from dynamiccl.server.learner import CoordinateDescentTuner, ExhaustiveSweepTuner, NcclDefaultTuner, Tuner, respond
from dynamiccl.sim import PRESETS, Preset, SimulatedFabric, random_clusters
from dynamiccl.workloads.services import local_server

COLLECTIVES = (Collective.allreduce, Collective.allgather, Collective.reducescatter, Collective.broadcast)
SIZES = tuple(1024 * 4**i for i in range(11))  # 1 KiB .. 1 GiB
FABRIC_ID = "bench"
LIE_GAIN = 1.15  # the liar's claim: its config ran this much faster than the default
TWIN_ROUNDS = 3
console = Console(width=240)


@dataclass(frozen=True)
class Mode:
    agents: int
    wait: bool = True
    liar: bool = False
    twin: bool = False


MODES = {
    "one source": Mode(agents=1, twin=True),
    "four sources": Mode(agents=4, twin=True),
    "no wait": Mode(agents=1, wait=False),
    "liar": Mode(agents=4, liar=True),
}


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


class Liar:
    """A plausible liar: for every context, a valid config truly 30% or more slower than the
    default, claimed every round to run LIE_GAIN faster than the default."""

    def __init__(self, truth: SimulatedFabric, contexts: list[Context]) -> None:
        self.claims: dict[Context, tuple[NcclConfig, float]] = {}
        for context in contexts:
            default = truth.true_latency_us(context, NcclConfig())
            slow = [c for c in candidate_configs(truth.fabric, context)
                    if not c.is_default and truth.true_latency_us(context, c) > 1.3 * default]
            if slow:
                poison = min(slow, key=lambda c: truth.true_latency_us(context, c))  # the most plausible
                self.claims[context] = (poison, default / LIE_GAIN)

    def lies(self, calls: int) -> list[Measurement]:
        return [Measurement(context=c, config=k, latency_us=us, count=calls, source="sim", job_id="bench")
                for c, (k, us) in self.claims.items()]


class OverHttp(Strategy):
    """DynamICCL through its public API, on a server process of its own, fed by a fleet of agents."""

    def __init__(self, name: str, base_url: str, sim: SimulatedFabric, fabric_id: str, tokens: dict[str, str],
                 mode: Mode, liar: Liar | None = None) -> None:
        self.name, self.mode, self.liar = name, mode, liar
        self.agents = [DynamicclClient(base_url, token=token, timeout=60) for token in tokens.values()]
        self.api = self.agents[-1] if liar else self.agents[0]  # the liar (agent 0) does not ask
        self.fabric_id = fabric_id
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
            if k == 0 and self.liar is not None:
                share = share + self.liar.lies(share[0].count if share else 20)
            if share:
                agent.post_measurements(self.fabric_id, f"batch-{next(self._batches)}", share)
                self._sent += len(share)
        self._round += 1

    def recommend(self, contexts: list[Context]) -> RecommendResponse:
        self._wait_learned()
        return self.api.recommend(self.fabric_id, [c.weighted() for c in contexts])

    def _wait_learned(self, timeout: float = 120.0) -> None:
        if not self.mode.wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.get_fabric(self.fabric_id).learner.get("measurements_learned", 0) >= self._sent:
                return
            time.sleep(0.05)
        raise TimeoutError("the server's learner did not catch up")


@dataclass
class LoopResult:
    name: str
    spent_us: float = 0.0
    default_us: float = 0.0
    excess_us: float = 0.0  # time spent beyond the default's on calls that ran slower than it
    regret_logs: list[float] = field(default_factory=list)
    invalid: int = 0
    recommendation: RecommendResponse | None = None

    @property
    def regret(self) -> float:
        return math.expm1(float(np.mean(self.regret_logs)))

    @property
    def online(self) -> float:
        return self.default_us / self.spent_us

    @property
    def exploration_cost(self) -> float:
        return self.excess_us / self.default_us


def run_loop(strategy: Strategy, sim: SimulatedFabric, contexts: list[Context], rounds: int, calls: int,
             oracle: Sequence[float], default: Sequence[float], progress: Progress | None = None,
             task=None) -> LoopResult:
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
            result.excess_us += max(true_us - default[i], 0.0)
            result.regret_logs.append(math.log(true_us / oracle[i]))
            measurements.append(
                Measurement(context=context, config=config, latency_us=sim.run(context, config, calls),
                            count=calls, source="sim", job_id="bench")
            )
        strategy.report(measurements)
        if progress is not None:
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
    slower: int  # calls > 2% slower than the default
    worst_call: float  # the largest time run / default time


def score(times: Sequence[float], oracle: Sequence[float], default: Sequence[float]) -> Scores:
    t, o, d = np.asarray(times), np.asarray(oracle), np.asarray(default)
    return Scores(
        of_oracle=float(np.exp(np.mean(np.log(o / t)))),
        speedup=float(np.exp(np.mean(np.log(d / t)))),
        worst=float(np.min(o / t)),
        slower=int(np.sum(t > 1.02 * d)),
        worst_call=float(np.max(t / d)),
    )


@dataclass
class Scored:
    """One strategy on one cluster, scored as recommended, as the rules run and as the env runs."""

    cluster: str
    strategy: str
    contexts: int
    headroom: float
    recommended: Scores
    rules: Scores
    env: Scores
    example_plugin: Scores
    loop: LoopResult
    liar_recommended: int | None = None
    twin: Scores | None = None


class Cluster:
    """A simulated cluster with its ground truth for scoring."""

    def __init__(self, preset: Preset, seed: int) -> None:
        self.preset = preset
        self.contexts = contexts_for(preset)
        self.truth = SimulatedFabric(preset, seed=seed)
        self.oracle = [self.truth.oracle(c)[1] for c in self.contexts]
        self.default = [self.truth.true_latency_us(c, NcclConfig()) for c in self.contexts]
        self.headroom = float(np.exp(np.mean(np.log(np.asarray(self.default) / np.asarray(self.oracle)))))

    def score(self, answer: RecommendResponse) -> tuple[Scores, Scores, Scores, Scores]:
        """The recommendation, its rules under DynamICCL's plugin, its env, and (to show why the
        launcher will not do it) its rules under NCCL's example plugin."""
        truth, rules_text = self.truth, answer.tuner_config
        recommended = [truth.true_latency_us(r.context, r.config) for r in answer.recommendations]
        rules = [truth.latency_under_rules(c, rules_text) for c in self.contexts]
        env = [truth.latency_under_env(c, answer.env) for c in self.contexts]
        example = [truth.latency_under_rules(c, rules_text, example_plugin=True) for c in self.contexts]
        return tuple(score(times, self.oracle, self.default) for times in (recommended, rules, env, example))


def bench_cluster(cluster: Cluster, url: str, tokens: dict[str, str], modes: Sequence[str], rounds: int,
                  calls: int, seed: int, baselines: bool, progress: Progress) -> list[Scored]:
    preset, contexts = cluster.preset, cluster.contexts
    strategies: list[tuple[Strategy, Mode | None]] = []
    if baselines:
        strategies += [(InProcess(name, tuner, cluster.truth), None) for name, tuner in (
            ("NCCL default", NcclDefaultTuner()), ("exhaustive sweep", ExhaustiveSweepTuner()),
            ("coordinate descent", CoordinateDescentTuner()))]
    for name in modes:
        mode = MODES[name]
        liar = Liar(cluster.truth, contexts) if mode.liar else None
        chosen = dict(list(tokens.items())[: mode.agents])
        strategies.append((OverHttp(f"DynamICCL, {name}", url, cluster.truth,
                                    f"{preset.name}-{seed}-{name.replace(' ', '-')}", chosen, mode, liar), mode))
    results = []
    for strategy, mode in strategies:
        task = progress.add_task(f"{preset.name}: {strategy.name}", total=rounds)
        sim = SimulatedFabric(preset, seed=seed + 1)  # same cluster, its own noise stream
        loop = run_loop(strategy, sim, contexts, rounds, calls, cluster.oracle, cluster.default, progress, task)
        progress.remove_task(task)
        scored = Scored(preset.name, strategy.name, len(contexts), cluster.headroom,
                        *cluster.score(loop.recommendation), loop)
        if mode is not None and mode.liar:
            claims = strategy.liar.claims
            scored.liar_recommended = sum(r.config == claims.get(r.context, (None,))[0]
                                          for r in loop.recommendation.recommendations)
        if mode is not None and mode.twin:
            twin = OverHttp(strategy.name, url, cluster.truth, f"{strategy.fabric_id}-twin",
                            dict(list(tokens.items())[: mode.agents]), mode)
            twin_loop = run_loop(twin, SimulatedFabric(preset, seed=seed + 2), contexts, TWIN_ROUNDS, calls,
                                 cluster.oracle, cluster.default)
            scored.twin = cluster.score(twin_loop.recommendation)[1]
        results.append(scored)
    return results


def _pct(value: float) -> str:
    return f"{value:.1%}"


def detail_table(title: str, results: list[Scored]) -> Table:
    table = Table(title=title)
    for column in ("cluster", "strategy", "headroom", "% oracle", "worst", "rules % oracle", "rules speedup",
                   "rules slower", "rules worst call", "env % oracle", "env slower", "example plugin slower",
                   "regret", "explore", "online", "liar", "twin after 3"):
        table.add_column(column, justify="left" if column in ("cluster", "strategy") else "right")
    previous = None
    for r in results:
        if previous is not None and r.cluster != previous:
            table.add_section()
        previous = r.cluster
        table.add_row(
            r.cluster, r.strategy, f"{r.headroom:.3f}", _pct(r.recommended.of_oracle), f"{r.recommended.worst:.3f}",
            _pct(r.rules.of_oracle), f"{r.rules.speedup:.3f}", f"{r.rules.slower}/{r.contexts}",
            f"{r.rules.worst_call:.2f}", _pct(r.env.of_oracle), str(r.env.slower), str(r.example_plugin.slower),
            _pct(r.loop.regret), _pct(r.loop.exploration_cost),
            f"{r.loop.online:.3f}", "" if r.liar_recommended is None else str(r.liar_recommended),
            "" if r.twin is None else _pct(r.twin.of_oracle),
        )
    return table


def summary_table(title: str, results: list[Scored], modes: Sequence[str]) -> Table:
    """Per DynamICCL mode over all clusters: geometric means of per-cluster figures, worst cases
    and totals."""
    table = Table(title=title)
    for column in ("mode", "clusters", "% oracle", "worst", "regress", "rules % oracle", "rules speedup",
                   "rules slower calls", "rules worst call", "env speedup", "env slower", "regret (max)",
                   "explore (max)", "online (min)", "liar recommended", "twin after 3"):
        table.add_column(column, justify="left" if column == "mode" else "right")

    def geo(values: list[float]) -> float:
        return float(np.exp(np.mean(np.log(values))))

    for name in modes:
        rows = [r for r in results if r.strategy == f"DynamICCL, {name}"]
        if not rows:
            continue
        twins = [r.twin.of_oracle for r in rows if r.twin is not None]
        liars = [r.liar_recommended for r in rows if r.liar_recommended is not None]
        table.add_row(
            name, str(len(rows)), _pct(geo([r.recommended.of_oracle for r in rows])),
            f"{min(r.recommended.worst for r in rows):.3f}", str(sum(r.recommended.slower for r in rows)),
            _pct(geo([r.rules.of_oracle for r in rows])), f"{geo([r.rules.speedup for r in rows]):.3f}",
            f"{sum(r.rules.slower for r in rows)}/{sum(r.contexts for r in rows)}",
            f"{max(r.rules.worst_call for r in rows):.2f}", f"{geo([r.env.speedup for r in rows]):.3f}",
            str(sum(r.env.slower for r in rows)),
            f"{_pct(geo([1 + r.loop.regret for r in rows]) - 1)} ({_pct(max(r.loop.regret for r in rows))})",
            f"{_pct(float(np.mean([r.loop.exploration_cost for r in rows])))} "
            f"({_pct(max(r.loop.exploration_cost for r in rows))})",
            f"{geo([r.loop.online for r in rows]):.3f} ({min(r.loop.online for r in rows):.3f})",
            str(sum(liars)) if liars else "", _pct(geo(twins)) if twins else "",
        )
    headroom = geo([r.headroom for r in results if r.strategy.startswith("DynamICCL")] or [1.0])
    table.caption = f"oracle over NCCL's default (headroom), geometric mean over clusters: {headroom:.3f}"
    return table


def main(
    presets: str = typer.Option(",".join(PRESETS), help="comma-separated preset names ('' for none)"),
    random: int = typer.Option(20, min=0, help="seeded random clusters"),
    first_seed: int = typer.Option(0, help="seed of the first random cluster"),
    modes: str = typer.Option(",".join(MODES), help="comma-separated DynamICCL modes"),
    rounds: int = typer.Option(30, min=1),
    calls: int = typer.Option(20, min=1, help="calls averaged per measurement"),
    seed: int = typer.Option(0),
    baselines: bool = typer.Option(True, help="run the baselines on the presets too"),
) -> None:
    chosen_modes = [m for m in modes.split(",") if m]
    unknown = set(chosen_modes) - set(MODES)
    if unknown:
        raise typer.BadParameter(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    tokens = agent_tokens(max(MODES[m].agents for m in chosen_modes))
    os.environ["DYNAMICCL_TOKENS"] = ",".join(f"{name}:{token}" for name, token in tokens.items())
    preset_results: list[Scored] = []
    random_results: list[Scored] = []
    with tempfile.TemporaryDirectory() as workdir, \
            local_server(f"sqlite:///{workdir}/bench.db", Path(workdir)) as server, \
            Progress(console=console, transient=True) as progress:
        runs = [(PRESETS[name], baselines, preset_results) for name in filter(None, presets.split(","))]
        runs += [(preset, False, random_results) for preset in random_clusters(random, first_seed)]
        overall = progress.add_task("clusters", total=len(runs))
        for preset, with_baselines, results in runs:
            done = bench_cluster(Cluster(preset, seed), server.url, tokens, chosen_modes, rounds, calls, seed,
                                 with_baselines, progress)
            progress.console.print(detail_table(preset.name, done))  # each cluster as it finishes
            results += done
            progress.advance(overall)
    what = f"after {rounds} rounds ({calls} calls a measurement)"
    if preset_results:
        console.print(detail_table(f"Presets, {what}", preset_results))
        console.print(summary_table("Presets: DynamICCL per mode", preset_results, chosen_modes))
    if random_results:
        console.print(detail_table(f"Random clusters, {what}", random_results))
        console.print(summary_table(f"{random} random clusters: DynamICCL per mode", random_results, chosen_modes))


if __name__ == "__main__":
    typer.run(main)

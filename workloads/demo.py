"""`dynamiccl demo`: the whole DynamICCL loop on one machine, in a few minutes.

1. A tuning server (SQLite) starts on loopback.
2. Simulated jobs (the collective traces of real model layouts on
   simulated GPU clusters) tune online through the public API: each round
   they ask `/v1/suggest`, run what they were told on the simulator and
   report the timings; two replicas of each job take turns, as a fleet's
   jobs would. After every round the current recommendation is scored on the
   simulator's ground truth (which the server never sees).
3. A node agent starts, and a real DP x TP x PP training run on gloo goes
   through `dynamiccl launch`: its collectives are timed by the hook and
   reach the server through the agent.
4. A table per fabric and layout: communication time per step with NCCL's
   default, with what DynamICCL would apply (its per-size tuner rules), and
   with the best config for every call (the oracle); then the env and rules
   themselves, and a figure (speedup per round, bus bandwidth by size).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dynamiccl.agent_client import AgentClient, AgentError
from dynamiccl.client import DynamicclClient
from dynamiccl.schemas import Collective, Context, Measurement, NcclConfig, RecommendResponse
from dynamiccl.sim import SimulatedFabric, get_preset
from dynamiccl.sweep import message_sizes
from dynamiccl.workloads.figure import write_figure
from dynamiccl.workloads.services import CLI, free_port, local_agent, local_server
from dynamiccl.workloads.trace import LLAMA3_8B, LLAMA3_70B, Layout, ModelShape, TraceEntry, step_trace

console = Console(width=None if sys.stdout.isatty() else 160)
T = TypeVar("T")


@dataclass(frozen=True)
class Scenario:
    """One simulated job: the calls each pipeline stage makes in a step, on a preset."""

    preset: str
    name: str
    stages: tuple[tuple[TraceEntry, ...], ...]
    gpus: int

    @property
    def contexts(self) -> list[Context]:
        return list(dict.fromkeys(e.context for stage in self.stages for e in stage))

    def step_time_us(self, latency_us: Callable[[Context], float]) -> float:
        """Communication time per step of the slowest stage, calls run one after another."""
        return max(sum(e.calls * latency_us(e.context) for e in stage) for stage in self.stages)

    def weights(self) -> dict[Context, float]:
        calls: dict[Context, float] = defaultdict(float)
        for stage in self.stages:
            for entry in stage:
                calls[entry.context] += entry.calls
        return calls


def layout_scenario(preset: str, model_name: str, model: ModelShape, layout: Layout) -> Scenario:
    parts = [f"{kind.upper()}{degree}" for kind, degree in (("tp", layout.tp), ("pp", layout.pp), ("dp", layout.dp))
             if degree > 1]
    stages = tuple(tuple(step_trace(model, layout, stage)) for stage in range(layout.pp))
    return Scenario(preset, f"{model_name} {' x '.join(parts)}", stages, layout.world)


def sweep_scenario(preset: str, nodes: int) -> Scenario:
    """An nccl-tests-like all-reduce sweep, 4 KiB to 1 GiB, one call a size."""
    gpus = nodes * get_preset(preset).fabric.gpus_per_node
    entries = tuple(TraceEntry(Context(collective=Collective.allreduce, nbytes=size, nranks=gpus, nnodes=nodes),
                               1, "sweep") for size in message_sizes(4096, 1 << 30, 4))
    return Scenario(preset, "allreduce sweep 4 KiB-1 GiB", (entries,), gpus)


def default_scenarios() -> list[Scenario]:
    gpus8 = dict(gpus_per_node=8, micro_batch_size=1, seq_len=4096)
    return [
        layout_scenario("h100-ib-2n", "Llama-3-8B", LLAMA3_8B, Layout(tp=8, dp=2, micro_batches=4, **gpus8)),
        layout_scenario("h100-ib-2n", "Llama-3-70B", LLAMA3_70B, Layout(tp=8, pp=2, micro_batches=8, **gpus8)),
        layout_scenario("a100-ib-2n", "Llama-3-8B", LLAMA3_8B,
                        Layout(tp=4, dp=4, micro_batches=4, sequence_parallel=True, **gpus8)),
        layout_scenario("l40s-roce-2n", "Llama-3-8B", LLAMA3_8B,
                        Layout(tp=2, pp=2, dp=2, micro_batches=8, gpus_per_node=4, seq_len=4096)),
        sweep_scenario("a100-ib-2n", nodes=2),
    ]


@dataclass
class Outcome:
    """A scenario's latency per call (us, noiseless) by NCCL's default, the oracle and DynamICCL."""

    scenario: Scenario
    default: dict[Context, float]
    oracle: dict[Context, float]
    recommended: dict[Context, float] = field(default_factory=dict)  # each call's recommendation
    tuned: dict[Context, float] = field(default_factory=dict)  # what a --mode plugin job runs: the rules
    env_only: dict[Context, float] = field(default_factory=dict)  # what a --mode env job runs
    explored_us: float = 0.0  # step time of the tuning rounds, summed
    speedup_by_round: list[float] = field(default_factory=list)
    answer: RecommendResponse | None = None

    def step_us(self, latency: dict[Context, float]) -> float:
        return self.scenario.step_time_us(latency.__getitem__)


class OnlineTuning:
    """Runs scenarios' tuning rounds through the server's public API, the simulator standing in for GPUs."""

    def __init__(self, api: DynamicclClient, calls_per_measurement: int = 20, seed: int = 0) -> None:
        self.api = api
        self.calls = calls_per_measurement
        self.seed = seed
        self._sims: dict[str, SimulatedFabric] = {}
        self._sent: dict[str, int] = defaultdict(int)

    def _fabric(self, preset: str) -> tuple[str, SimulatedFabric]:
        """The preset's fabric id on the server (registered on first use) and its simulator."""
        if preset not in self._sims:
            self._sims[preset] = SimulatedFabric(get_preset(preset), seed=self.seed)
            self.api.put_fabric(f"demo-{preset}", self._sims[preset].fabric)
        return f"demo-{preset}", self._sims[preset]

    def start(self, scenario: Scenario) -> Outcome:
        _, sim = self._fabric(scenario.preset)
        contexts = scenario.contexts
        return Outcome(scenario, default={c: sim.true_latency_us(c, NcclConfig()) for c in contexts},
                       oracle={c: sim.oracle(c)[1] for c in contexts})

    def round(self, outcome: Outcome, index: int) -> None:
        """One round of one of the job's two replicas: suggest, run, report; then score the recommendation."""
        scenario = outcome.scenario
        fabric_id, sim = self._fabric(scenario.preset)
        job = f"{_slug(scenario.name)}-{'ab'[index % 2]}"
        suggestions = self.api.suggest(fabric_id, scenario.contexts, job_id=job, round=index // 2)
        outcome.explored_us += outcome.step_us({s.context: sim.true_latency_us(s.context, s.config)
                                                for s in suggestions})
        measurements = [Measurement(context=s.context, config=s.config, count=self.calls, source="sim",
                                    latency_us=sim.run(s.context, s.config, self.calls), job_id=job,
                                    suggestion_id=s.suggestion_id) for s in suggestions]
        self.api.post_measurements(fabric_id, f"{job}-round-{index // 2}", measurements)
        self._sent[fabric_id] += len(measurements)
        self._score(outcome)

    def _score(self, outcome: Outcome) -> None:
        scenario = outcome.scenario
        fabric_id, sim = self._fabric(scenario.preset)
        self._wait_learned(fabric_id)
        weights = scenario.weights()
        answer = self.api.recommend(fabric_id, [c.weighted(weights[c]) for c in scenario.contexts])
        outcome.recommended = {r.context: sim.true_latency_us(r.context, r.config) for r in answer.recommendations}
        # As DynamICCL's plugin runs them: every call no rule covers is NCCL's own choice.
        outcome.tuned = {c: sim.latency_under_rules(c, answer.tuner_config) for c in scenario.contexts}
        outcome.env_only = {c: sim.latency_under_env(c, answer.env) for c in scenario.contexts}
        outcome.speedup_by_round.append(outcome.step_us(outcome.default) / outcome.step_us(outcome.tuned))
        outcome.answer = answer

    def _wait_learned(self, fabric_id: str, timeout_s: float = 60.0) -> None:
        """Recommendations are scored once the server's learner has read every reported measurement."""
        deadline = time.monotonic() + timeout_s
        while self.api.get_fabric(fabric_id).learner.get("measurements_learned", 0) < self._sent[fabric_id]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server's learner did not catch up on {fabric_id}")
            time.sleep(0.05)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def _ms(us: float) -> str:
    return f"{us / 1e3:,.2f}"


def outcome_table(outcomes: Iterable[Outcome]) -> Table:
    table = Table(title="Communication time per training step (slowest pipeline stage, simulated, ms)")
    for column in ("fabric", "workload", "GPUs", "NCCL default", "plugin job", "oracle", "speedup",
                   "of headroom", "calls slower", "recommended", "env job", "tuning rounds"):
        table.add_column(column, justify="left" if column in ("fabric", "workload") else "right")
    for o in outcomes:
        default, tuned, oracle = o.step_us(o.default), o.step_us(o.tuned), o.step_us(o.oracle)
        headroom = default - oracle
        captured = f"{(default - tuned) / headroom:.0%}" if headroom > 0.005 * default else "none left"
        slower = sum(o.tuned[c] > 1.02 * o.default[c] for c in o.scenario.contexts)
        rounds = len(o.speedup_by_round)
        table.add_row(o.scenario.preset, o.scenario.name, str(o.scenario.gpus), _ms(default), _ms(tuned),
                      _ms(oracle), f"{default / tuned:.3f}x", captured, f"{slower}/{len(o.scenario.contexts)}",
                      f"{default / o.step_us(o.recommended):.3f}x", f"{default / o.step_us(o.env_only):.3f}x",
                      f"{default * rounds / o.explored_us:.3f}x")
    table.caption = ("plugin job: what a `dynamiccl launch --mode plugin` job runs, the tuner rules as DynamICCL's "
                     "plugin applies them (calls slower: > 2% slower than NCCL's default); recommended: the "
                     "per-call recommendations; env job: what --mode env runs; tuning rounds: speedup while "
                     "exploring")
    return table


def print_settings(outcomes: Iterable[Outcome]) -> None:
    for o in outcomes:
        answer = o.answer
        if answer is None:
            continue
        env = " ".join(f"{k}={v}" for k, v in sorted(answer.env.items())) \
            or "(NCCL's default: no variable is safe for every call of this job)"
        rules = [line for line in answer.tuner_config.splitlines() if line and not line.startswith("#")]
        changed = sum(not r.config.is_default for r in answer.recommendations)
        console.print(f"[bold]{o.scenario.preset} / {o.scenario.name}[/bold]: {changed} of "
                      f"{len(answer.recommendations)} calls tuned")
        console.print(f"  env: {env}", markup=False, highlight=False)
        for rule in rules:
            console.print(f"  rule: {rule}", markup=False, highlight=False)


def run_real_job(server_url: str, workdir: Path, steps: int) -> None:
    """A DP2 x TP2 x PP2 training run on gloo under `dynamiccl launch`, reported through a node agent."""
    with local_agent(server_url, workdir) as agent_process, \
            AgentClient(agent_process.url) as agent:
        agent_url = agent_process.url
        health = _wait_for(agent.health, lambda h: h.get("registered"), 30.0)
        command = [*CLI, "launch", "--agent", agent_url, "--job", "demo-gloo", "--", sys.executable, "-m",
                   "torch.distributed.run", "--nproc-per-node=8", f"--master-port={free_port()}", "-m",
                   "dynamiccl.workloads.train", "--tp=2", "--pp=2", "--dp=2", f"--steps={steps}", "--seq-len=32"]
        console.rule("real training run: gloo, DP2 x TP2 x PP2 on 8 processes, under dynamiccl launch")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(command, env=env, timeout=600)
        if done.returncode:
            raise RuntimeError(f"the training run failed with exit status {done.returncode}")
        with DynamicclClient(server_url) as api:
            fabric = health["fabric_id"]
            status = _wait_for(lambda: api.get_fabric(fabric), lambda s: s.measurements > 0, 30.0)
        console.print(f"the hook timed the run's collectives; the agent sent them to the server: fabric "
                      f"{fabric} holds {status.measurements} measurements of {status.contexts} kinds of call")


def _wait_for(read: Callable[[], T], ready: Callable[[T], object], timeout_s: float) -> T:
    """The first value `read` returns that is `ready`, polling through transient errors."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = read()
            if ready(value):
                return value
        except (httpx.HTTPError, AgentError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("gave up waiting for the node agent")
        time.sleep(0.2)


def run_demo(rounds: int, out: Path, real_steps: int, seed: int) -> None:
    started = time.monotonic()
    scenarios = default_scenarios()
    with tempfile.TemporaryDirectory(prefix="dynamiccl-demo-") as tmp:
        workdir = Path(tmp)
        with local_server(f"sqlite:///{workdir / 'dynamiccl.db'}", workdir) as server, \
                DynamicclClient(server.url, timeout=60) as api:
            server_url = server.url
            console.print(f"tuning server up at {server_url} (SQLite in {workdir})")
            tuning = OnlineTuning(api, seed=seed)
            outcomes = [tuning.start(s) for s in scenarios]
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as progress:
                tasks = [progress.add_task(f"{s.preset:13} {s.name}", total=rounds) for s in scenarios]
                for index in range(rounds):
                    for outcome, task in zip(outcomes, tasks):
                        tuning.round(outcome, index)
                        progress.advance(task)
            if real_steps:
                run_real_job(server_url, workdir, real_steps)
    console.print(outcome_table(outcomes))
    print_settings(outcomes)
    write_figure(outcomes, out)
    console.print(f"figure: {out.resolve()}  (demo took {time.monotonic() - started:.0f} s)")

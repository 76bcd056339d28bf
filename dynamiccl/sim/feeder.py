"""`dynamiccl sim-job`: simulated training jobs that feed a node agent, so a fresh deployment
shows data within a minute.

Each job tunes for a few rounds (asks the server what to try, runs it on a simulated preset and
reports the timings through the agent), then asks the agent for its recommendation and runs
with it, reporting those timings too. The agent must serve the preset's fabric under the same
fabric id (start it with the preset's hardware as overrides); the job checks this first.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence

import httpx
import typer

from dynamiccl.agent_api import AGENT_URL_ENV, DEFAULT_AGENT_URL
from dynamiccl.agent_client import AgentClient, AgentError
from dynamiccl.client import DynamicclClient
from dynamiccl.schemas import Collective, Context, Fabric, Measurement, NcclConfig
from dynamiccl.sim.fabric import SimulatedFabric
from dynamiccl.sim.presets import Preset, get_preset

log = logging.getLogger("dynamiccl.sim.feeder")
COLLECTIVES = (Collective.allreduce, Collective.allgather, Collective.reducescatter)
SIZES = (16 << 10, 512 << 10, 8 << 20, 128 << 20, 1 << 30)  # one per size class of the dashboards


def job_contexts(preset: Preset) -> list[Context]:
    """The calls of one simulated job: three collectives at five sizes over the largest communicator."""
    nnodes = preset.node_counts[-1]
    nranks = nnodes * preset.fabric.gpus_per_node
    return [Context(collective=c, nbytes=n, nranks=nranks, nnodes=nnodes) for c in COLLECTIVES for n in SIZES]


class SimJobFeeder:
    def __init__(self, agent: AgentClient, server: DynamicclClient, preset: Preset, fabric_id: str,
                 count: int = 20, interval_s: float = 1.0) -> None:
        self.agent, self.server, self.fabric_id = agent, server, fabric_id
        self.sim = SimulatedFabric(preset)
        self.contexts = job_contexts(preset)
        self.count, self.interval_s = count, interval_s

    def wait_for_fabric(self, timeout_s: float = 120.0) -> None:
        """Wait until the agent has registered its fabric; refuse one that is not the preset's."""
        deadline = time.monotonic() + timeout_s
        while not self._agent_registered():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent at {self.agent.url} did not register its fabric "
                                   f"within {timeout_s:.0f} s")
            time.sleep(1.0)
        served = Fabric.model_validate(self.server.get_fabric(self.fabric_id).model_dump())
        if served != self.sim.fabric:
            raise RuntimeError(f"fabric {self.fabric_id} is {served.model_dump_json()} on the server, but the "
                               f"simulated preset is {self.sim.fabric.model_dump_json()}: start the agent "
                               "with the preset's hardware as overrides (--gpu, --gpus-per-node, ...)")

    def _agent_registered(self) -> bool:
        try:
            return bool(self.agent.health().get("registered"))
        except (httpx.TransportError, AgentError):
            return False

    def run_job(self, job_id: str, tune_rounds: int, run_rounds: int) -> None:
        for round_ in range(tune_rounds):
            suggestions = self.server.suggest(self.fabric_id, self.contexts, job_id=job_id, round=round_)
            self._report(job_id, [(s.context, s.config, s.suggestion_id) for s in suggestions])
        answer = self.agent.recommend(job_id, [c.weighted() for c in self.contexts])
        for _ in range(run_rounds):
            self._report(job_id, [(r.context, r.config, None) for r in answer.recommendations])
        status = self.server.get_fabric(self.fabric_id)
        log.info("job %s done (source of its recommendation: %s); fabric %s: %d measurements, %d contexts",
                 job_id, answer.source, self.fabric_id, status.measurements, status.contexts)

    def _report(self, job_id: str, runs: Sequence[tuple[Context, NcclConfig, str | None]]) -> None:
        measurements = [
            Measurement(context=context, config=config, latency_us=self.sim.run(context, config, self.count),
                        count=self.count, source="sim", job_id=job_id, ts=time.time(), suggestion_id=suggestion)
            for context, config, suggestion in runs
        ]
        delivery = self.agent.post_measurements(job_id, [m.model_dump(mode="json", exclude_none=True)
                                                          for m in measurements])
        if delivery.refused:
            raise AgentError(422, delivery.reason)
        time.sleep(self.interval_s)


def sim_job(
    server: str = typer.Option(..., envvar="DYNAMICCL_SERVER", help="URL of the tuning server"),
    agent: str = typer.Option(DEFAULT_AGENT_URL, envvar=AGENT_URL_ENV, help="node agent URL"),
    preset: str = typer.Option("h100-ib-2n", help="simulated preset (`dynamiccl fabrics`)"),
    fabric_id: str | None = typer.Option(None, help="the agent's fabric id (default sim-PRESET)"),
    token: str | None = typer.Option(None, envvar="DYNAMICCL_TOKEN", help="bearer token for the server"),
    jobs: int = typer.Option(1, min=0, help="jobs to run one after another (0: forever)"),
    tune_rounds: int = typer.Option(10, min=0, help="rounds each job spends on suggestions"),
    run_rounds: int = typer.Option(20, min=0, help="rounds each job then runs its recommendation"),
    count: int = typer.Option(20, min=1, help="calls timed per measurement"),
    interval: float = typer.Option(1.0, min=0.0, help="seconds between rounds"),
) -> None:
    """Run simulated jobs through a node agent: tune online, then run the recommendation."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    try:
        chosen = get_preset(preset)
    except KeyError as error:
        raise typer.BadParameter(str(error), param_hint="--preset") from None
    fabric_id = fabric_id or f"sim-{chosen.name}"
    prefix = f"sim-{int(time.time())}"
    with AgentClient(agent, timeout=30.0) as agent_api, \
            DynamicclClient(server, token, timeout=30.0) as server_api:
        feeder = SimJobFeeder(agent_api, server_api, chosen, fabric_id, count=count, interval_s=interval)
        try:
            feeder.wait_for_fabric()
        except RuntimeError as error:
            typer.echo(f"dynamiccl sim-job: {error}", err=True)
            raise typer.Exit(1) from None
        for n in itertools.count() if jobs == 0 else range(jobs):
            feeder.run_job(f"{prefix}-{n}", tune_rounds, run_rounds)

"""Every `Tuner` behind the same cases (as one suite runs over every sampler): what the
interface promises, whichever tuner answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from dynamiccl.nccl.space import is_valid
from dynamiccl.schemas import Context, Measurement, NcclConfig
from dynamiccl.server.learner import (
    CoordinateDescentTuner,
    ExhaustiveSweepTuner,
    NcclDefaultTuner,
    Tuner,
    respond,
)
from dynamiccl.server.learner.tuner import DynamicclTuner
from dynamiccl.server.storage import SqlStore
from dynamiccl.sim import PRESETS, SimulatedFabric

PRESET = PRESETS["h100-ib-2n"]
CONTEXTS = [Context(collective=c, nbytes=4**k * 1024, nranks=16, nnodes=2)
            for c in ("allreduce", "allgather") for k in range(0, 11, 2)]
FACTORIES: dict[str, Callable[[SqlStore], Tuner]] = {
    "dynamiccl": DynamicclTuner,
    "nccl default": lambda store: NcclDefaultTuner(),
    "exhaustive sweep": lambda store: ExhaustiveSweepTuner(),
    "coordinate descent": lambda store: CoordinateDescentTuner(),
}


@pytest.fixture(params=list(FACTORIES))
def tuner(request, sqlite_store) -> Iterator[Tuner]:
    sqlite_store.put_fabric("f", PRESET.fabric)
    tuner = FACTORIES[request.param](sqlite_store)
    yield tuner
    tuner.close()


def feed(tuner: Tuner, store: SqlStore, batch_id: str, measurements: list[Measurement]) -> None:
    """What the server does with a batch: store it, tell the tuner, and (here) let it catch up."""
    store.add_batch("f", batch_id, measurements, "agent")
    tuner.observe("f", PRESET.fabric, measurements)
    last_id = store.last_measurement_id("f")
    assert tuner.catch_up("f", PRESET.fabric, timeout_s=30, target_id=last_id)
    assert tuner.caught_up("f", PRESET.fabric, last_id), "what a handler on the event loop asks first"


def closed_loop(tuner: Tuner, store: SqlStore, rounds: int) -> SimulatedFabric:
    sim = SimulatedFabric(PRESET, seed=5)
    for round_index in range(rounds):
        picks = tuner.suggest("f", PRESET.fabric, CONTEXTS, seed=round_index)
        assert len(picks) == len(CONTEXTS)
        assert all(is_valid(PRESET.fabric, c, p.config) for c, p in zip(CONTEXTS, picks)), "only runnable configs"
        feed(tuner, store, f"round-{round_index}", [
            Measurement(context=c, config=p.config, latency_us=sim.run(c, p.config), count=20, source="sim")
            for c, p in zip(CONTEXTS, picks)])
    return sim


def test_with_nothing_measured_every_decision_is_nccls_default(tuner):
    decisions = tuner.recommend("f", PRESET.fabric, CONTEXTS)
    assert [d.context for d in decisions] == CONTEXTS
    assert all(d.candidates[0] == NcclConfig() and not d.departs for d in decisions)
    answer = respond([c.weighted() for c in CONTEXTS], decisions)
    assert answer.env == {} and answer.tuner_config.strip().startswith("#")
    assert len(answer.tuner_config.strip().splitlines()) == 1, "no rules: every call is NCCL's"


def test_after_tuning_no_call_is_slower_than_nccls_default_as_the_job_runs_it(tuner, sqlite_store):
    sim = closed_loop(tuner, sqlite_store, rounds=12)
    decisions = tuner.recommend("f", PRESET.fabric, CONTEXTS)
    for decision in decisions:
        if decision.departs:
            assert decision.estimate.samples >= 3 or decision.estimate.transferred, "measured, not guessed"
            assert is_valid(PRESET.fabric, decision.context, decision.config)
    answer = respond([c.weighted() for c in CONTEXTS], decisions)
    default = np.array([sim.true_latency_us(c, NcclConfig()) for c in CONTEXTS])
    decided = np.array([sim.true_latency_us(d.context, d.config) for d in decisions])
    rules = np.array([sim.latency_under_rules(c, answer.tuner_config) for c in CONTEXTS])
    env = np.array([sim.latency_under_env(c, answer.env) for c in CONTEXTS])
    assert np.allclose(rules, decided), "DynamICCL's plugin runs exactly what was decided"
    for times in (decided, rules, env):
        assert np.all(times <= 1.02 * default)

"""The learner in a closed loop on a simulated fabric: it gains where there is headroom, never
regresses, never suggests what the fabric cannot run, and carries what it learned to a twin fabric."""

import dataclasses

import numpy as np
import pytest

from dynamiccl.nccl import candidate_configs, is_valid
from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.schemas import Algo, Context, Measurement, NcclConfig, Proto, SuggestionKind
from dynamiccl.server.learner import respond
from dynamiccl.server.learner.stats import cell_key
from dynamiccl.server.learner.tuner import DynamicclTuner
from dynamiccl.sim import PRESETS, SimulatedFabric
from dynamiccl.sim.truth import Effects

PRESET = PRESETS["h100-ib-2n"]
AGENTS = 4
CONTEXTS = [
    Context(collective=c, nbytes=s, nranks=16, nnodes=2)
    for c in ("allreduce", "allgather", "broadcast")
    for s in (1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 28)
]


def run_loop(tuner, store, fabric_id, sim, rounds):
    store.put_fabric(fabric_id, sim.fabric)
    kinds = []
    for round_index in range(rounds):
        tuner.knowledge.get(fabric_id, sim.fabric)
        tuner.knowledge.wait_idle(timeout=30)
        picks = tuner.suggest(fabric_id, sim.fabric, CONTEXTS, seed=round_index)
        assert all(is_valid(sim.fabric, c, p.config) for c, p in zip(CONTEXTS, picks))
        kinds.append([p.kind for p in picks])
        batch = [Measurement(context=c, config=p.config, latency_us=sim.run(c, p.config), count=20, source="sim")
                 for c, p in zip(CONTEXTS, picks)]
        for agent in range(AGENTS):  # a fleet: each context's turn goes to the agents in rotation
            share = [m for i, m in enumerate(batch) if (i + round_index) % AGENTS == agent]
            store.add_batch(fabric_id, f"round-{round_index}-{agent}", share, f"agent-{agent}")
        tuner.observe(fabric_id, sim.fabric, batch)
    tuner.knowledge.wait_idle(timeout=30)
    return kinds


@pytest.fixture
def tuner(sqlite_store):
    tuner = DynamicclTuner(sqlite_store)
    yield tuner
    tuner.close()


def recommend(tuner, fabric_id, fabric):
    return respond([c.weighted() for c in CONTEXTS], tuner.recommend(fabric_id, fabric, CONTEXTS))


def true_times(sim, configs):
    return np.array([sim.true_latency_us(c, k) for c, k in zip(CONTEXTS, configs)])


def test_without_measurements_everything_stays_the_nccl_default(tuner, sqlite_store):
    sqlite_store.put_fabric("fresh", PRESET.fabric)
    answer = recommend(tuner, "fresh", PRESET.fabric)
    assert all(r.config.is_default and r.speedup == 1.0 for r in answer.recommendations)
    assert answer.env == {}


def test_closed_loop_gains_where_there_is_headroom_and_never_regresses(tuner, sqlite_store):
    sim = SimulatedFabric(PRESET, seed=7)
    kinds = run_loop(tuner, sqlite_store, "dgx", sim, rounds=24)
    assert set(kinds[0]) == {SuggestionKind.default}, "the baseline is measured first"
    assert SuggestionKind.explore in {k for round_kinds in kinds for k in round_kinds}

    answer = recommend(tuner, "dgx", sim.fabric)
    recommended = true_times(sim, [r.config for r in answer.recommendations])
    default = true_times(sim, [NcclConfig()] * len(CONTEXTS))
    oracle = np.array([sim.oracle(c)[1] for c in CONTEXTS])
    assert np.all(recommended <= default * 1.02), "no context is made slower"
    headroom = default / oracle > 1.1
    assert headroom.any()
    assert np.exp(np.mean(np.log(default[headroom] / recommended[headroom]))) > 1.05
    for r in answer.recommendations:
        if not r.config.is_default:
            assert r.samples >= 2 and r.confidence >= 0.95 and r.speedup > 1.0

    under_rules = np.array([sim.latency_under_rules(c, answer.tuner_config) for c in CONTEXTS])
    assert np.allclose(under_rules, recommended), "the tuner rules apply the recommendations as given"
    under_env = np.array([sim.latency_under_env(c, answer.env) for c in CONTEXTS])
    assert np.all(under_env <= default * 1.02), "the process-wide env slows no call"
    assert tuner.describe("dgx", sim.fabric)["measurements_learned"] == 24 * len(CONTEXTS)


def transferred_from(tuner, donor_id: str, fabric_id: str) -> list[bool]:
    """For each config the donor measured twice or more (not the default) and the fabric has no
    samples of, whether the fabric's estimate of it rests on the donor's measurements."""
    donor = tuner.knowledge.get(donor_id, PRESET.fabric).snapshot
    explored = [(context, config) for context in CONTEXTS for config in candidate_configs(PRESET.fabric, context)
                if not config.is_default and (cell := donor.cells.get(cell_key(context, config)))
                and cell.n >= 2 and cell.trusted]
    assert explored
    estimates = tuner.knowledge.get(fabric_id, PRESET.fabric).snapshot.estimates(
        [(context, [config]) for context, config in explored])
    return [e.transferred for (e,) in estimates if e.samples == 0]


def test_a_new_fabric_with_the_same_hardware_starts_from_what_its_twin_learned(tuner, sqlite_store):
    run_loop(tuner, sqlite_store, "cluster-a", SimulatedFabric(PRESET, seed=1), rounds=12)
    sqlite_store.put_fabric("cluster-b", PRESET.fabric)
    tuner.knowledge.get("cluster-b", PRESET.fabric)
    tuner.knowledge.wait_idle(timeout=30)
    answer = recommend(tuner, "cluster-b", PRESET.fabric)
    assert all(r.config.is_default for r in answer.recommendations), "no baseline of its own yet"
    picks = tuner.suggest("cluster-b", PRESET.fabric, CONTEXTS, seed=0)
    assert all(p.kind is SuggestionKind.default for p in picks)
    assert all(transferred_from(tuner, "cluster-a", "cluster-b")), "the twin's measurements back its configs"

    run_loop(tuner, sqlite_store, "cluster-b", SimulatedFabric(PRESET, seed=2), rounds=3)
    assert all(transferred_from(tuner, "cluster-a", "cluster-b")), "its own baseline agrees with the twin's"
    truth = SimulatedFabric(PRESET, seed=0)
    default = true_times(truth, [NcclConfig()] * len(CONTEXTS))
    learned, twin = (true_times(truth, [r.config for r in recommend(tuner, fabric_id, PRESET.fabric).recommendations])
                     for fabric_id in ("cluster-a", "cluster-b"))
    assert np.all(twin <= 1.02 * default)
    assert np.mean(np.log(default / twin)) >= np.mean(np.log(default / learned)) / 3 > 0, \
        "with a baseline of its own, it takes up gains its twin confirmed"


def test_a_fabric_with_the_same_hardware_that_measures_otherwise_stops_learning_from_the_other(tuner, sqlite_store):
    """Same GPUs, links and NICs, but a network that delivers a third less: its own measurements
    of the defaults disagree with the other fabric's, so what the other measured no longer
    stands in for its own."""
    run_loop(tuner, sqlite_store, "cluster-a", SimulatedFabric(PRESET, seed=1), rounds=12)
    other = dataclasses.replace(PRESET, name="slower-network", effects=Effects(net_efficiency=(0.65, 0.045)))
    run_loop(tuner, sqlite_store, "cluster-b", SimulatedFabric(other, seed=2), rounds=3)
    assert not any(transferred_from(tuner, "cluster-a", "cluster-b"))


def test_a_config_nccls_model_rates_twice_as_slow_but_that_is_fastest_is_found(tuner, sqlite_store):
    """On a cluster where ring/LL moves 4x what NCCL's model says, mid-size all-gathers and
    reduce-scatters run fastest on a pair the model rates 2x slower than its own choice: the prior
    orders what is tried, it does not forbid it. Exploration stays cheap while it looks."""
    preset = dataclasses.replace(PRESET, name="ring-ll-4x", effects=Effects(pair_bias=((Algo.ring, Proto.ll, 4.0),)))
    truth, sim, model = SimulatedFabric(preset, seed=0), SimulatedFabric(preset, seed=1), NcclCostModel(preset.fabric)
    contexts = [Context(collective=c, nbytes=4**k * 1024, nranks=16, nnodes=2)
                for c in ("allgather", "reducescatter") for k in range(11)]
    hard = [i for i, c in enumerate(contexts)
            if not (best := truth.oracle(c)[0]).is_default
            and model.time_us(c, best.algo, best.proto, best.nchannels) >= 2 * model.time_us(c, None, None, None)]
    assert hard, "the cluster has such contexts"
    sqlite_store.put_fabric("f", preset.fabric)
    default = np.array([truth.true_latency_us(c, NcclConfig()) for c in contexts])
    excess = 0.0
    for round_index in range(30):
        assert tuner.catch_up("f", preset.fabric, timeout_s=30) and tuner.knowledge.wait_idle(timeout=30)
        picks = tuner.suggest("f", preset.fabric, contexts, seed=round_index)
        ran = np.array([truth.true_latency_us(c, p.config) for c, p in zip(contexts, picks)])
        excess += float(np.sum(np.maximum(ran - default, 0.0)))
        batch = [Measurement(context=c, config=p.config, latency_us=sim.run(c, p.config), count=20, source="sim")
                 for c, p in zip(contexts, picks)]
        sqlite_store.add_batch("f", f"round-{round_index}", batch, "job")
        tuner.observe("f", preset.fabric, batch)
    assert tuner.catch_up("f", preset.fabric, timeout_s=30) and tuner.knowledge.wait_idle(timeout=30)
    decisions = tuner.recommend("f", preset.fabric, contexts)
    for i in hard:
        assert truth.oracle(contexts[i])[1] / truth.true_latency_us(contexts[i], decisions[i].config) >= 0.95
    assert excess / (30 * default.sum()) <= 0.10, "time lost to exploration, over what the default would take"

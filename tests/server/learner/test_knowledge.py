"""What a fabric's knowledge costs a request: decisions are made once per snapshot and then looked
up, predictions once per model; the surrogate is refit when the evidence changes, not on a timer,
and a request that brings it much it has not seen waits for it. And what the snapshot's estimates
make of the evidence: a lone sample's spread, novelty, how far NCCL's model is off, how far a twin
fabric's evidence counts."""

import math

from dynamiccl.nccl import candidate_configs
from dynamiccl.schemas import Context, Measurement, NcclConfig
from dynamiccl.server.learner.knowledge import (
    TRANSFER_STD,
    UNFITTED_CELLS,
    CellSummary,
    FabricKnowledge,
    KnowledgeBase,
    lent_cells,
    model_error,
    transfer_spread,
)
from dynamiccl.server.learner.policy import NOVEL_STD
from dynamiccl.server.learner.prior import NcclPrior
from dynamiccl.server.learner.stats import SINGLE_SAMPLE_STD, cell_key
from dynamiccl.sim import PRESETS, SimulatedFabric

PRESET = PRESETS["h100-ib-2n"]
CONTEXTS = [Context(collective=c, nbytes=1 << s, nranks=16, nnodes=2) for c in ("allreduce", "allgather")
            for s in (12, 20, 28)]


def measured(store, batch_id: str, rounds: int = 3) -> None:
    sim = SimulatedFabric(PRESET, seed=0)
    batch = [Measurement(context=c, config=k, latency_us=sim.run(c, k), count=20, source="sim", job_id="job")
             for _ in range(rounds) for c in CONTEXTS for k in candidate_configs(PRESET.fabric, c)[:4]]
    store.add_batch("f", batch_id, batch)


def test_a_decision_once_made_is_looked_up_and_weights_do_not_enter_it(sqlite_store):
    sqlite_store.put_fabric("f", PRESET.fabric)
    measured(sqlite_store, "b1")
    knowledge = FabricKnowledge("f", PRESET.fabric)
    knowledge.refresh(sqlite_store, [])
    first = knowledge.decisions(CONTEXTS)
    again = knowledge.decisions([c.weighted(7.0) for c in reversed(CONTEXTS)])
    assert all(a is b for a, b in zip(first, reversed(again))), "the same decision objects, in request order"
    assert all(type(d.context) is Context for d in again), "a request's weight is not part of the decision"
    assert [d.context for d in first] == CONTEXTS


def test_the_surrogate_is_refit_only_when_the_evidence_changed(sqlite_store):
    sqlite_store.put_fabric("f", PRESET.fabric)
    measured(sqlite_store, "b1")
    knowledge = FabricKnowledge("f", PRESET.fabric)
    assert knowledge.refresh(sqlite_store, []) is True
    fitted = knowledge.snapshot
    assert knowledge.refresh(sqlite_store, []) is False and knowledge.snapshot is fitted
    measured(sqlite_store, "b2", rounds=1)
    assert knowledge.refresh(sqlite_store, []) is True
    assert knowledge.snapshot.measurements_seen > fitted.measurements_seen


def test_rows_folded_in_by_a_catch_up_are_still_refit_on(sqlite_store):
    sqlite_store.put_fabric("f", PRESET.fabric)
    measured(sqlite_store, "b1")
    knowledge = FabricKnowledge("f", PRESET.fabric)
    knowledge.refresh(sqlite_store, [])
    measured(sqlite_store, "b2", rounds=1)
    assert knowledge.catch_up(sqlite_store, sqlite_store.last_measurement_id("f"), timeout_s=10)
    assert knowledge.refresh(sqlite_store, []) is True, "the catch-up kept the old surrogate: refit it"


def test_a_suggestion_after_many_new_cells_waits_for_the_refit_and_after_known_ones_does_not(sqlite_store):
    """A client that posts and asks at once, round after round, would otherwise explore by the
    surrogate of its first rounds; measuring again what the surrogate has seen never waits."""
    sqlite_store.put_fabric("f", PRESET.fabric)
    refits: list[float] = []
    base = KnowledgeBase(sqlite_store, on_refit=refits.append)
    try:
        knowledge = base.get("f", PRESET.fabric)
        assert base.wait_idle(30)
        measured(sqlite_store, "b1")  # 24 cells the surrogate has not seen
        assert len(CONTEXTS) * 4 >= UNFITTED_CELLS
        fitted = len(refits)
        assert base.catch_up("f", PRESET.fabric, timeout_s=30, with_model=True)
        assert not knowledge.surrogate_behind() and len(refits) == fitted + 1, "answered after the refit"
        measured(sqlite_store, "b2", rounds=1)  # the same cells again
        assert base.catch_up("f", PRESET.fabric, timeout_s=30, with_model=True)
        assert len(refits) == fitted + 1, "answered at once: the refit follows at its own pace"
    finally:
        base.close()


def test_a_model_predicts_each_pair_once_and_alike(sqlite_store, monkeypatch):
    """A model never changes, so a request that re-judges contexts after new measurements (same
    model, new samples) looks its predictions up instead of asking every tree again."""
    sqlite_store.put_fabric("f", PRESET.fabric)
    measured(sqlite_store, "b1")
    knowledge = FabricKnowledge("f", PRESET.fabric)
    knowledge.refresh(sqlite_store, [])
    model = knowledge.snapshot.model
    pairs = [(c, k) for c in CONTEXTS for k in candidate_configs(PRESET.fabric, c)]
    first = model.predict(pairs)

    def refuse(asked):
        raise AssertionError(f"the trees were asked again about {len(asked)} pairs")

    monkeypatch.setattr(model, "_predict_batch", refuse)
    again = model.predict(list(reversed(pairs)))
    for before, after in zip(first, again):
        assert list(before) == list(reversed(after))


def _estimate_of(knowledge: FabricKnowledge, context: Context, config: NcclConfig):
    return knowledge.snapshot.estimates([(context, [NcclConfig(), config])])[0][1]


def test_a_lone_sample_is_no_surer_in_the_posterior_than_it_is_alone(sqlite_store):
    """The surrogate was fit to that very sample, so however closely it echoes a straggler's slow
    timing, the config keeps the spread of one sample: it gets a second look, not a verdict."""
    sqlite_store.put_fabric("f", PRESET.fabric)
    measured(sqlite_store, "b1")
    context = CONTEXTS[1]
    config = candidate_configs(PRESET.fabric, context)[5]
    sqlite_store.add_batch("f", "lone", [Measurement(context=context, config=config, latency_us=500.0, count=20,
                                                     source="sim", job_id="job")])
    knowledge = FabricKnowledge("f", PRESET.fabric)
    knowledge.refresh(sqlite_store, [])
    lone = _estimate_of(knowledge, context, config)
    assert lone.samples == 1 and lone.std >= SINGLE_SAMPLE_STD / math.sqrt(2) - 1e-9
    repeated = _estimate_of(knowledge, context, candidate_configs(PRESET.fabric, context)[1])
    assert repeated.samples == 3 and repeated.std < lone.std / 2


def test_a_pair_is_novel_where_nobody_measured_it_at_that_size_trusted_or_not(sqlite_store):
    """Novelty is judged on the evidence: an unconfirmed claim (one of two sources) says the pair
    was tried at that size, for every call shape alike; and a catch-up's rows count at once,
    before any refit of the surrogate."""
    sqlite_store.put_fabric("f", PRESET.fabric)
    small, other_shape, large = (Context(collective="allgather", nbytes=1 << 20, nranks=16, nnodes=2),
                                 Context(collective="allgather", nbytes=1 << 20, nranks=8, nnodes=2),
                                 Context(collective="allgather", nbytes=1 << 30, nranks=16, nnodes=2))
    ring_ll = NcclConfig(algo="ring", proto="ll", nchannels=8)
    default_by_both = [Measurement(context=small, config=NcclConfig(), latency_us=100.0, count=20,
                                   source="sim", job_id=job) for job in ("job-a", "job-b")]
    sqlite_store.add_batch("f", "defaults", default_by_both)
    knowledge = FabricKnowledge("f", PRESET.fabric)
    knowledge.refresh(sqlite_store, [], fit=False)
    assert _estimate_of(knowledge, other_shape, ring_ll).novel
    claim = Measurement(context=small, config=ring_ll, latency_us=90.0, count=20, source="sim", job_id="job-a")
    sqlite_store.add_batch("f", "claim", [claim])
    assert knowledge.catch_up(sqlite_store, sqlite_store.last_measurement_id("f"), timeout_s=10)
    assert not knowledge.snapshot.cells[cell_key(small, ring_ll)].trusted, "one of two sources: unconfirmed"
    assert not _estimate_of(knowledge, other_shape, ring_ll).novel
    assert _estimate_of(knowledge, large, ring_ll).novel, "another size level is still NCCL's model alone"


def test_how_far_nccls_model_is_off_is_learned_where_pairs_were_measured():
    """Measured just as NCCL's model predicts, the fabric's pairs pull the novel spread below
    NOVEL_STD; measured twice as slow, above it. Lone and untrusted cells say nothing."""
    prior = NcclPrior(PRESET.fabric)
    contexts = [Context(collective=c, nbytes=1 << s, nranks=16, nnodes=2)
                for c in ("allreduce", "allgather", "reducescatter") for s in range(12, 31, 2)]

    def cells(off_by: float, n: int = 4, trusted: bool = True) -> dict:
        summaries = {}
        for context in contexts:
            for config in candidate_configs(PRESET.fabric, context):
                error = 0.0 if config.is_default else off_by
                summaries[cell_key(context, config)] = CellSummary(
                    prior.log_time(context, config) + error, 0.01, n, context.nbytes, 1, trusted)
        return summaries

    assert model_error(prior, cells(0.0)) < 0.7 * NOVEL_STD
    assert model_error(prior, cells(math.log(2.0))) > NOVEL_STD
    assert model_error(prior, cells(0.0, n=1)) == model_error(prior, cells(0.0, trusted=False)) == NOVEL_STD


def test_a_twin_lends_evidence_as_good_as_the_two_fabrics_agree():
    """What a fabric with the same hardware measured is this fabric's evidence only as far as the
    two agree where both measured: TRANSFER_STD before they share a cell, narrower for a twin that
    matches, wider for one whose cells are 10% off."""
    prior = NcclPrior(PRESET.fabric)
    contexts = [Context(collective=c, nbytes=1 << s, nranks=16, nnodes=2)
                for c in ("allreduce", "allgather", "reducescatter", "broadcast") for s in range(12, 31)]

    def defaults(off_by: float, n: int = 3) -> dict:
        return {cell_key(c, NcclConfig()): CellSummary(prior.log_time(c, NcclConfig()) + off_by * (-1) ** i, 0.01,
                                                       n, c.nbytes, 1, True) for i, c in enumerate(contexts)}

    own = defaults(0.0)
    assert transfer_spread(own, defaults(0.0, n=1)) == TRANSFER_STD, "no cell measured twice by both"
    assert transfer_spread(own, defaults(0.0)) < TRANSFER_STD / 2
    assert transfer_spread(own, defaults(math.log(1.1))) > TRANSFER_STD
    lent = lent_cells(own, defaults(0.0))
    assert all(math.isclose(lent[key].std_error, math.hypot(0.01, transfer_spread(own, defaults(0.0)))) for key in own)


def test_a_sample_of_its_own_beside_a_twins_evidence_leaves_a_config_no_less_certain(sqlite_store):
    """A config the twin measured often and this fabric once: the lone sample may be a straggler's,
    but the twin's evidence still counts, so the estimate is at least as sure as without it."""
    sqlite_store.put_fabric("a", PRESET.fabric)
    sqlite_store.put_fabric("b", PRESET.fabric)
    sim = SimulatedFabric(PRESET, seed=0)
    context = CONTEXTS[1]
    config = candidate_configs(PRESET.fabric, context)[1]
    sqlite_store.add_batch("a", "a1", [Measurement(context=c, config=k, latency_us=sim.run(c, k), count=20,
                                                   source="sim", job_id="job")
                                       for _ in range(8) for c in CONTEXTS for k in (NcclConfig(), config)])
    sqlite_store.add_batch("b", "b1", [Measurement(context=c, config=NcclConfig(), latency_us=sim.run(c, NcclConfig()),
                                                   count=20, source="sim", job_id="job")
                                       for _ in range(3) for c in CONTEXTS])
    twin, fabric = FabricKnowledge("a", PRESET.fabric), FabricKnowledge("b", PRESET.fabric)
    twin.refresh(sqlite_store, [])
    fabric.refresh(sqlite_store, [twin])
    without = _estimate_of(fabric, context, config)
    sqlite_store.add_batch("b", "b2", [Measurement(context=context, config=config, latency_us=sim.run(context, config),
                                                   count=20, source="sim", job_id="job")])
    fabric.refresh(sqlite_store, [twin])
    alone = _estimate_of(fabric, context, config)
    assert without.samples == 0 and without.transferred and alone.samples == 1
    assert alone.std <= without.std < TRANSFER_STD

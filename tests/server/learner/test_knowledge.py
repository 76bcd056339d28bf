"""What a fabric's knowledge costs a request: decisions are made once per snapshot and then looked
up, predictions once per model; the surrogate is refit when the evidence changes, not on a timer."""

from dynamiccl.nccl import candidate_configs
from dynamiccl.schemas import Context, Measurement
from dynamiccl.server.learner.knowledge import FabricKnowledge
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

"""Retention changes nothing the learner knows: a fabric whose old measurements were compacted
(all but the rows its cells hold samples of) is judged alike by this replica and by one that
starts afresh from the compacted store, and the API's counts stay."""

import time

import pytest

from dynamiccl.nccl import candidate_configs
from dynamiccl.schemas import Context, Measurement
from dynamiccl.server.app import RETENTION_ENV, retention_from_env
from dynamiccl.server.learner.stats import MAX_SAMPLES_PER_SOURCE
from dynamiccl.server.learner.tuner import DynamicclTuner
from dynamiccl.server.storage import SqlStore
from dynamiccl.sim import PRESETS, SimulatedFabric

PRESET = PRESETS["h100-ib-2n"]
CONTEXTS = [Context(collective=c, nbytes=1 << s, nranks=16, nnodes=2) for c in ("allreduce", "allgather")
            for s in (12, 20, 26)]
SOURCES = ("agent-0", "agent-1", "agent-2")
CONFIGS = 5  # of each context: 30 cells, enough for the surrogate's trees


def history(store: SqlStore, rounds: int) -> None:
    """Three sources measure the same five configs of every context, round after round: more samples
    per cell and source than a cell keeps."""
    sim = SimulatedFabric(PRESET, seed=3)
    store.put_fabric("f", PRESET.fabric)
    for round_index in range(rounds):
        for source in SOURCES:
            batch = [Measurement(context=c, config=k, latency_us=sim.run(c, k), count=20, source="sim", job_id="job")
                     for c in CONTEXTS for k in candidate_configs(PRESET.fabric, c)[:CONFIGS]]
            store.add_batch("f", f"{source}-{round_index}", batch, source)


def judged(store: SqlStore) -> tuple[list, list]:
    """A fresh replica's decisions (config and confidence) and estimates of every candidate."""
    tuner = DynamicclTuner(store)
    try:
        assert tuner.catch_up("f", PRESET.fabric, timeout_s=30) and tuner.knowledge.wait_idle(timeout=60)
        decisions = tuner.recommend("f", PRESET.fabric, CONTEXTS)
        return ([(d.config, round(d.confidence, 9)) for d in decisions],
                [[(round(e.mean, 9), round(e.std, 9), e.samples, e.trusted) for e in d.estimates] for d in decisions])
    finally:
        tuner.close()


@pytest.mark.slow
def test_compaction_changes_no_recommendation_and_no_count(sqlite_store):
    history(sqlite_store, rounds=24)
    counts = sqlite_store.fabric_counts("f")
    before = judged(sqlite_store)

    tuner = DynamicclTuner(sqlite_store)
    try:
        tuner.catch_up("f", PRESET.fabric, timeout_s=30)
        deleted = tuner.knowledge.compact("f", received_before=time.time() + 1)
        kept = MAX_SAMPLES_PER_SOURCE
        assert deleted == len(SOURCES) * len(CONTEXTS) * CONFIGS * (24 - kept), "each source's samples past the newest 16"
        assert tuner.describe("f", PRESET.fabric)["measurements_learned"] == counts[0]
    finally:
        tuner.close()

    assert sqlite_store.fabric_counts("f") == counts
    assert len(sqlite_store.measurements("f")) == counts[0] - deleted
    assert judged(sqlite_store) == before, "a replica starting from the compacted store judges alike"


def test_a_server_with_a_retention_compacts_on_its_own(sqlite_store):
    history(sqlite_store, rounds=20)
    compacted = []
    tuner = DynamicclTuner(sqlite_store, retention_s=0.0, on_compact=lambda fabric, rows: compacted.append(rows))
    try:
        tuner.observe("f", PRESET.fabric, [])
        assert tuner.knowledge.wait_idle(timeout=60)
    finally:
        tuner.close()
    assert compacted == [len(SOURCES) * len(CONTEXTS) * CONFIGS * (20 - MAX_SAMPLES_PER_SOURCE)]
    assert sum(c.rows for c in sqlite_store.compacted("f")) == compacted[0]


def test_retention_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(RETENTION_ENV, raising=False)
    assert retention_from_env() == 30 * 86400
    monkeypatch.setenv(RETENTION_ENV, "forever")
    assert retention_from_env() is None
    monkeypatch.setenv(RETENTION_ENV, "a month")
    with pytest.raises(ValueError, match=RETENTION_ENV):
        retention_from_env()

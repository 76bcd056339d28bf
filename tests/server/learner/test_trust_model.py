"""The learner's trust model (knowledge.py): what one source can and cannot make the server
recommend, and a recommendation withdrawn when it runs slower in use."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import pytest

from dynamiccl.schemas import Context, Measurement, NcclConfig
from dynamiccl.server.learner.tuner import DynamicclTuner
from dynamiccl.sim import PRESETS

FABRIC = PRESETS["h100-ib-2n"].fabric
CONTEXT = Context(collective="allreduce", nbytes=1 << 26, nranks=16, nnodes=2)
DEFAULT = NcclConfig()
FAST = NcclConfig(algo="ring", proto="simple", nchannels=24)
batch_ids = count()


@pytest.fixture
def tuner(sqlite_store) -> Iterator[DynamicclTuner]:
    sqlite_store.put_fabric("f", FABRIC)
    tuner = DynamicclTuner(sqlite_store)
    yield tuner
    tuner.close()


def post(tuner: DynamicclTuner, source: str, config: NcclConfig, latencies: list[float],
         context: Context = CONTEXT) -> None:
    """What the server does with a batch from `source` (a token name): store it, tell the learner."""
    store = tuner.knowledge._store
    measurements = [Measurement(context=context, config=config, latency_us=us, count=20, source="torch",
                                job_id=f"job-of-{source}") for us in latencies]
    store.add_batch("f", f"b{next(batch_ids)}", measurements, source)
    tuner.observe("f", FABRIC, measurements)


def recommended(tuner: DynamicclTuner, context: Context = CONTEXT) -> NcclConfig:
    assert tuner.catch_up("f", FABRIC, timeout_s=10), "reads its own writes"
    (decision,) = tuner.recommend("f", FABRIC, [context])
    return decision.config


def interleaved(tuner: DynamicclTuner, source: str, default_us: float, fast_us: float, rounds: int = 5) -> None:
    for k in range(rounds):
        post(tuner, source, DEFAULT, [default_us * (1 + 0.01 * (k % 2))])
        post(tuner, source, FAST, [fast_us * (1 + 0.01 * (k % 3))])


def test_one_sources_consistent_evidence_changes_its_fabrics_recommendation(tuner):
    interleaved(tuner, "only-job", default_us=1000.0, fast_us=800.0)
    assert recommended(tuner) == FAST


def test_a_claim_on_a_context_others_measure_waits_for_a_second_source(tuner):
    for source in ("a", "b", "c"):
        post(tuner, source, DEFAULT, [1000.0, 1005.0])
    post(tuner, "a", FAST, [800.0, 801.0, 799.0])
    assert recommended(tuner) == DEFAULT, "one source's word, others report on the context"
    post(tuner, "b", FAST, [805.0, 802.0])
    assert recommended(tuner) == FAST


def test_a_claim_an_honest_source_contradicts_is_never_recommended(tuner):
    for source in ("liar", "honest"):
        post(tuner, source, DEFAULT, [1000.0, 1003.0, 998.0])
    post(tuner, "liar", FAST, [870.0] * 6)  # plausible: 15% faster, near what NCCL's model says
    post(tuner, "honest", FAST, [1300.0, 1310.0])
    assert recommended(tuner) == DEFAULT
    post(tuner, "accomplice", FAST, [870.0] * 6)
    assert recommended(tuner) == DEFAULT, "contested: an accomplice does not outvote a measurement"


def test_a_recommendation_that_runs_slower_in_use_is_withdrawn(tuner):
    for source in ("a", "b"):
        interleaved(tuner, source, default_us=1000.0, fast_us=800.0)
    assert recommended(tuner) == FAST
    for source in ("c", "d", "e"):  # more jobs agree with a and b ...
        post(tuner, source, FAST, [800.0, 802.0])
    post(tuner, "user", DEFAULT, [700.0, 701.0, 699.0])  # ... but on this source's nodes the default wins
    post(tuner, "user", FAST, [900.0, 905.0])
    assert recommended(tuner) == DEFAULT, "withdrawn: slower in use than the same source's default"
    assert tuner.describe("f", FABRIC)["configs_withdrawn"] == 1


def test_one_slow_sample_in_use_withdraws_nothing(tuner):
    for source in ("a", "b"):
        interleaved(tuner, source, default_us=1000.0, fast_us=800.0)
    post(tuner, "user", FAST, [2400.0])  # a straggler: contested until the user measures again
    assert recommended(tuner) == DEFAULT and tuner.describe("f", FABRIC)["configs_withdrawn"] == 0
    post(tuner, "user", FAST, [805.0])
    assert recommended(tuner) == FAST

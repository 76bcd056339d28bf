"""The guard: one decision, for every tuner, between a measured config and NCCL's default."""

import math

from dynamiccl.schemas import Context, NcclConfig
from dynamiccl.server.learner.base import Estimate
from dynamiccl.server.learner.guard import (
    CONFIDENCE,
    MAX_CALL_LOSS,
    MIN_DEFAULT_SAMPLES,
    MIN_SAMPLES,
    decide,
    forced_cost,
)

CONTEXT = Context(collective="allreduce", nbytes=1 << 20, nranks=16, nnodes=2)
CANDIDATES = [NcclConfig(), NcclConfig(algo="ring", proto="simple"), NcclConfig(algo="tree", proto="simple")]


def est(mean, std=0.01, samples=MIN_SAMPLES, transferred=False, trusted=True):
    return Estimate(mean=math.log(mean), std=std, samples=samples, transferred=transferred, trusted=trusted)


def verdict_of(estimates):
    return decide(CONTEXT, CANDIDATES[: len(estimates)], estimates)


def test_recommends_a_confidently_faster_measured_config():
    verdict = verdict_of([est(100), est(80), est(90)])
    assert verdict.chosen == 1 and verdict.confidence >= CONFIDENCE


def test_keeps_the_default_when_the_gain_is_not_confident():
    verdict = verdict_of([est(100, std=0.1), est(97, std=0.1)])
    assert verdict.chosen == 0


def test_keeps_the_default_when_the_gain_is_below_one_percent():
    assert verdict_of([est(100, std=0.001), est(99.5, std=0.001)]).chosen == 0


def test_never_recommends_a_config_measured_once_or_never():
    assert verdict_of([est(100), est(50, samples=1)]).chosen == 0
    assert verdict_of([est(100), est(50, samples=0)]).chosen == 0


def test_transferred_evidence_makes_an_unmeasured_config_eligible():
    verdict = verdict_of([est(100), est(50, samples=0, transferred=True)])
    assert verdict.chosen == 1


def test_a_sample_of_its_own_beside_transferred_evidence_keeps_a_config_eligible():
    assert verdict_of([est(100), est(50, samples=1, transferred=True)]).chosen == 1


def test_the_default_is_a_baseline_once_measured_min_default_samples_times():
    assert verdict_of([est(100, samples=MIN_DEFAULT_SAMPLES), est(50)]).chosen == 1
    assert verdict_of([est(100, samples=MIN_DEFAULT_SAMPLES - 1), est(50)]).chosen == 0


def test_nothing_known_means_the_default_with_no_confidence():
    verdict = verdict_of([est(100, std=0.15, samples=0), est(90, std=0.15, samples=0)])
    assert verdict.chosen == 0 and verdict.confidence == 0.0


def test_untrusted_evidence_for_the_config_or_the_default_decides_nothing():
    assert verdict_of([est(100), est(50)]).chosen == 1
    assert verdict_of([est(100), est(50, trusted=False)]).chosen == 0
    assert verdict_of([est(100, trusted=False), est(50)]).chosen == 0


def test_a_setting_may_force_only_configs_known_not_to_slow_the_call():
    decision = verdict_of([est(100), est(80), est(101)])
    assert forced_cost(decision, NcclConfig()) == decision.default.latency_us
    assert forced_cost(decision, CANDIDATES[1]) < 100
    assert math.isinf(forced_cost(verdict_of([est(100), est(80), est(100 * MAX_CALL_LOSS)]), CANDIDATES[2]))
    assert math.isinf(forced_cost(decision, NcclConfig(algo="ring", proto="ll")))  # no evidence at all

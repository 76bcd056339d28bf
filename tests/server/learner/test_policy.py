"""Exploration and recommendation decisions from posterior estimates (log latency)."""

import math

import numpy as np

from dynamiccl.server.learner.knowledge import Estimate
from dynamiccl.server.learner.policy import (
    CONFIDENCE,
    DEFAULT_SAMPLES,
    choose_recommendation,
    choose_suggestion,
    expected_improvement,
)

RNG = np.random.default_rng(0)


def est(mean, std=0.01, samples=DEFAULT_SAMPLES, transferred=False):
    return Estimate(mean=math.log(mean), std=std, samples=samples, transferred=transferred)


def test_the_default_is_measured_first():
    choice = choose_suggestion([est(100, samples=0), est(50, std=0.5, samples=0)], RNG)
    assert choice.index == 0 and not choice.explore


def test_a_config_that_may_be_much_faster_is_explored():
    choice = choose_suggestion([est(100), est(90, std=0.1, samples=0)], RNG)
    assert choice.index == 1 and choice.explore


def test_the_default_is_measured_again_to_confirm_an_uncertain_gain():
    choice = choose_suggestion([est(100, std=0.03), est(97, std=0.01, samples=8)], RNG)
    assert choice.index == 0


def test_a_config_known_to_be_slow_is_never_tried():
    choice = choose_suggestion([est(100), est(150, std=0.02, samples=0)], RNG)
    assert choice.index == 0 and not choice.explore


def test_once_everything_plausible_is_measured_the_best_is_exploited():
    choice = choose_suggestion([est(100), est(80, samples=5), est(120, samples=2)], RNG)
    assert choice.index == 1 and not choice.explore


def test_expected_improvement_grows_with_uncertainty():
    ei = expected_improvement(0.0, np.array([0.1, 0.1]), np.array([0.01, 0.2]))
    assert ei[1] > ei[0] >= 0


def test_recommends_a_confidently_faster_measured_config():
    verdict = choose_recommendation([est(100), est(80), est(90)])
    assert verdict.index == 1 and verdict.confidence >= CONFIDENCE


def test_keeps_the_default_when_the_gain_is_not_confident():
    verdict = choose_recommendation([est(100, std=0.1), est(97, std=0.1)])
    assert verdict.index == 0


def test_keeps_the_default_when_the_gain_is_below_one_percent():
    assert choose_recommendation([est(100, std=0.001), est(99.5, std=0.001)]).index == 0


def test_never_recommends_a_config_measured_once_or_never():
    assert choose_recommendation([est(100), est(50, samples=1)]).index == 0
    assert choose_recommendation([est(100), est(50, samples=0)]).index == 0


def test_transferred_evidence_makes_an_unmeasured_config_eligible():
    verdict = choose_recommendation([est(100), est(50, samples=0, transferred=True)])
    assert verdict.index == 1


def test_nothing_known_means_the_default_with_no_confidence():
    verdict = choose_recommendation([est(100, std=0.15, samples=0), est(90, std=0.15, samples=0)])
    assert verdict.index == 0 and verdict.confidence == 0.0

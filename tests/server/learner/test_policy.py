"""Exploration decisions from posterior estimates (log latency)."""

import math

import numpy as np

from dynamiccl.server.learner.base import Estimate
from dynamiccl.server.learner.guard import MIN_SAMPLES
from dynamiccl.server.learner.policy import (
    Choice,
    expected_improvement,
    novel_trial,
    plan,
)

RNG = np.random.default_rng(0)


def est(mean, std=0.01, samples=MIN_SAMPLES, transferred=False):
    return Estimate(mean=math.log(mean), std=std, samples=samples, transferred=transferred)


def test_the_default_is_measured_first():
    choice = plan([est(100, samples=0), est(50, std=0.5, samples=0)]).choose(RNG)
    assert choice.index == 0 and not choice.explore


def test_a_config_that_may_be_much_faster_is_explored():
    choice = plan([est(100), est(90, std=0.1, samples=0)]).choose(RNG)
    assert choice.index == 1 and choice.explore


def test_the_default_is_measured_again_to_confirm_an_uncertain_gain():
    choice = plan([est(100, std=0.03), est(97, std=0.01, samples=8)]).choose(RNG)
    assert choice.index == 0


def test_a_gain_just_confident_enough_to_recommend_is_confirmed_before_a_trial_worth_less():
    # P(gain) ~0.97: the guard recommends it, but its next samples could take that back
    default, incumbent, unexplored = est(100, std=0.02), est(95, std=0.01, samples=8), est(93, std=0.05, samples=0)
    assert plan([default, incumbent, unexplored]).choose(RNG) == Choice(0, explore=False)
    confirmed = est(100, std=0.01, samples=8)
    assert plan([confirmed, incumbent, unexplored]).choose(RNG).index == 2


def test_a_trial_that_may_gain_more_than_the_gain_being_confirmed_goes_first():
    default, small_gain = est(100, std=0.02), est(97, std=0.02)
    may_be_twice_as_fast = est(60, std=0.5, samples=0)
    tried = plan([default, small_gain, may_be_twice_as_fast])
    assert tried.choose(RNG) == Choice(2, explore=True) and tried.settled
    assert not plan([default, small_gain, est(96, std=0.02, samples=0)]).settled, "else it is confirmed"


def test_a_config_known_to_be_slow_is_never_tried():
    choice = plan([est(100), est(150, std=0.02, samples=0)]).choose(RNG)
    assert choice.index == 0 and not choice.explore


def test_once_everything_plausible_is_measured_the_best_is_exploited():
    choice = plan([est(100), est(80, samples=5), est(120, samples=2)]).choose(RNG)
    assert choice.index == 1 and not choice.explore


def test_expected_improvement_grows_with_uncertainty():
    ei = expected_improvement(0.0, np.array([0.1, 0.1]), np.array([0.01, 0.2]))
    assert ei[1] > ei[0] >= 0


def test_a_new_best_is_confirmed_before_anything_else_is_explored():
    promising = [est(100), est(80, samples=1, std=0.15), est(90, std=0.2, samples=0)]
    assert plan(promising).choose(RNG) == Choice(1, explore=False)
    confirmed = [est(100), est(80, samples=3), est(90, std=0.2, samples=0)]
    assert plan(confirmed).choose(RNG).index == 2, "then exploration resumes"


def test_nccls_model_orders_what_is_tried_but_forbids_nothing_it_may_be_wrong_about():
    # alone, a config rated up to ~1.9x slower is worth one trial; what neighbouring sizes teach
    # the surrogate moves the rest (test_dynamiccl_tuner: 2x and more, found)
    rated_much_slower = Estimate(mean=math.log(180), std=0.15, samples=0, novel=True)
    index, value = novel_trial([est(100), rated_much_slower])
    assert index == 1 and value > 0
    measured_nearby = Estimate(mean=math.log(180), std=0.15, samples=0, novel=False)
    assert novel_trial([est(100), measured_nearby]) is None
    assert plan([est(100), measured_nearby]).choose(RNG).index == 0
    hopeless = Estimate(mean=math.log(2000), std=0.15, samples=0, novel=True)
    assert novel_trial([est(100), hopeless]) is None, "still worth its cost, or not tried"


def test_where_nccls_model_proved_accurate_what_it_rates_slow_is_not_tried():
    rated_slower = Estimate(mean=math.log(150), std=0.15, samples=0, novel=True)
    assert novel_trial([est(100), rated_slower]) is not None
    assert novel_trial([est(100), rated_slower], novel_std=0.1) is None

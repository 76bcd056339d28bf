"""What a job is given, composed from decisions: rules only where a decision departs from NCCL's
default, and a process-wide env that slows no call."""

import math

from dynamiccl.nccl import first_match, parse_env, parse_rules
from dynamiccl.schemas import Algo, Collective, Context, NcclConfig, Proto
from dynamiccl.server.learner.base import Decision, Estimate
from dynamiccl.server.learner.compose import choose_env, respond, tuner_rules

RING = NcclConfig(algo="ring", proto="simple", nchannels=16)
TREE = NcclConfig(algo="tree", proto="ll", nchannels=8)
RING_NCCL_CHANNELS = NcclConfig(algo="ring", proto="simple")
DEFAULT = NcclConfig()


def ctx(nbytes, collective="allreduce", nranks=16, nnodes=2):
    return Context(collective=collective, nbytes=nbytes, nranks=nranks, nnodes=nnodes)


def measured(latency_us, samples=5, std=0.01):
    return Estimate(mean=math.log(latency_us), std=std, samples=samples)


def decided(context, config, default_us=100.0, chosen_us=80.0, others=()):
    """A decision for `config` (the default when `config` is the default), other candidates
    with their evidence in `others`."""
    candidates, estimates = [DEFAULT], [measured(default_us)]
    if not config.is_default:
        candidates.append(config)
        estimates.append(measured(chosen_us))
    for other, estimate in others:
        candidates.append(other)
        estimates.append(estimate)
    return Decision(context, tuple(candidates), tuple(estimates), 0 if config.is_default else 1, 0.99)


def test_each_departing_size_is_matched_by_exactly_what_was_decided():
    decisions = [decided(ctx(1 << 10), TREE), decided(ctx(1 << 20), RING), decided(ctx(1 << 30), RING),
                 decided(ctx(1 << 20, "allgather"), RING_NCCL_CHANNELS)]
    rules = parse_rules(respond([d.context.weighted() for d in decisions], decisions).tuner_config)
    for decision in decisions:
        assert first_match(rules, decision.context).config == decision.config
    allgather = first_match(rules, ctx(1 << 20, "allgather"))
    assert allgather.nchannels is None, "channels the decision leaves to NCCL are -1 in the rule"


def test_no_rule_where_the_decision_is_nccls_default():
    decisions = [decided(ctx(1 << 10), DEFAULT), decided(ctx(1 << 20), RING), decided(ctx(1 << 30), DEFAULT)]
    rules = tuner_rules(decisions)
    assert first_match(rules, ctx(1 << 10)) is None and first_match(rules, ctx(1 << 30)) is None
    (rule,) = rules
    assert (rule.min_bytes, rule.max_bytes) == (math.isqrt(1 << 30) + 1, math.isqrt(1 << 50)), \
        "a rule reaches the geometric midpoints to the sizes left to NCCL"
    assert tuner_rules([decided(ctx(1 << 20), DEFAULT)]) == []


def test_adjacent_sizes_with_the_same_decision_merge_and_the_ends_reach_an_octave_beyond():
    decisions = [decided(ctx(1 << 10), TREE), decided(ctx(1 << 12), TREE), decided(ctx(1 << 20), RING),
                 decided(ctx(1 << 30), RING)]
    rules = tuner_rules(decisions)
    assert [(r.algo.value, r.min_bytes) for r in rules] == [("tree", 1 << 9), ("ring", 2**16 + 1)]
    assert rules[-1].max_bytes == (1 << 31) + 1


def test_rules_are_scoped_to_the_node_and_rank_counts_they_were_learned_on():
    rules = tuner_rules([decided(ctx(1 << 20), RING)])
    assert first_match(rules, ctx(1 << 20, nranks=32, nnodes=4)) is None


def test_point_to_point_calls_get_no_rules():
    assert tuner_rules([decided(ctx(1 << 20, "alltoall"), NcclConfig(nchannels=8))]) == []


def test_env_sets_a_pair_where_every_call_of_the_collective_gains_or_keeps_within_the_guard():
    pair = NcclConfig(algo="ring", proto="simple")
    big = decided(ctx(1 << 30), pair, default_us=1000, chosen_us=800)
    small = decided(ctx(1 << 10), DEFAULT, others=[(pair, measured(100.0))])
    setting = parse_env(choose_env([1.0, 1.0], [big, small]))
    assert setting.algos == {Collective.allreduce: Algo.ring} and setting.protos == {Collective.allreduce: Proto.simple}
    assert setting.nchannels is None, "no process-wide channel count"


def test_env_leaves_a_collective_alone_when_the_pair_may_slow_one_of_its_calls():
    pair = NcclConfig(algo="ring", proto="simple")
    big = decided(ctx(1 << 30), pair, default_us=1000, chosen_us=800)
    slower = decided(ctx(1 << 10), DEFAULT, others=[(pair, measured(130.0))])
    unknown = decided(ctx(1 << 10), DEFAULT)
    untrusted = decided(ctx(1 << 10), DEFAULT, others=[(pair, Estimate(math.log(90), 0.01, 5, trusted=False))])
    for other in (slower, unknown, untrusted):
        assert choose_env([1.0, 1.0], [big, other]) == {}


def test_a_response_carries_one_recommendation_per_decision_with_its_evidence():
    decisions = [decided(ctx(1 << 20), RING, default_us=100, chosen_us=80), decided(ctx(1 << 10), DEFAULT)]
    response = respond([d.context.weighted() for d in decisions], decisions)
    first, second = response.recommendations
    assert first.config == RING and first.speedup == 1.25 and first.samples == 5
    assert second.config.is_default and second.speedup == 1.0

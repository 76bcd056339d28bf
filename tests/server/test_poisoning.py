"""Poisoned telemetry: a client reporting fake fast timings for a bad config must not get it
recommended to others. Sources vote (not samples), and on a context several sources report on
a recommendation needs corroborated evidence: agreeing sources, at least two and a third of
those sources (knowledge.py's trust model)."""

from __future__ import annotations

import math
import random

import pytest

from dynamiccl.schemas import Context, NcclConfig
from dynamiccl.server.learner.base import Estimate
from dynamiccl.server.learner.guard import MIN_SAMPLES, decide
from dynamiccl.server.learner.stats import Cell, distrusted_sources, pooled_noise

def cell(*samples: tuple[str, float]) -> Cell:
    c = Cell()
    for source, latency in samples:
        c.add(1 << 20, latency, source)
    return c


def test_one_source_posting_more_samples_gets_no_more_say():
    outvoted = cell(*[("liar", 10.0)] * 50, ("honest-1", 100.0), ("honest-2", 102.0))
    assert math.exp(outvoted.location()) == pytest.approx(101.0, rel=0.01)
    assert outvoted.corroborated()
    assert not cell(*[("liar", 10.0)] * 50, ("honest", 100.0)).corroborated(), "one against one: contested"


def test_agreeing_sources_corroborate_and_dissent_contests():
    honest = cell(("a", 100.0), ("b", 103.0), ("c", 98.0))
    assert honest.corroborated() and math.exp(honest.location()) == pytest.approx((100.0 * 103.0 * 98.0) ** (1 / 3))
    assert not cell(("a", 100.0), ("a", 101.0), ("a", 99.0)).corroborated(), "one source, however many samples"
    assert not cell(("liar-1", 10.0), ("liar-2", 10.0), ("honest", 100.0)).corroborated(), \
        "a claim someone else measured and could not reproduce"
    assert not cell(("liar-1", 10.0), ("liar-2", 10.0), ("h1", 100.0), ("h2", 101.0)).corroborated()
    assert cell(("liar-1", 10.0), ("liar-2", 10.0), *[(f"h{k}", 100.0) for k in range(3)]).location() > math.log(95)


def test_a_source_whose_claims_others_keep_refuting_is_left_out():
    checked = [cell(("liar-1", 10.0), ("liar-2", 10.0), ("honest", 100.0), ("honest", 101.0)) for _ in range(4)]
    unchecked = cell(("liar-1", 10.0), ("liar-2", 10.0))
    honest = [cell(("honest", 100.0), ("other", 104.0)) for _ in range(10)]
    straggler = [cell(("honest", 100.0), ("other", 250.0), ("other", 240.0))]  # once: noise, not a pattern
    distrusted = distrusted_sources([*checked, unchecked, *honest, *straggler])
    assert distrusted == {"liar-1", "liar-2"}
    assert unchecked.corroborated() and unchecked.without(distrusted) is None
    assert checked[0].without(distrusted).by_source.keys() == {"honest"}
    assert distrusted_sources([*checked[:2], *honest]) == frozenset(), "two refutations may be bad luck"


def test_a_lone_straggler_sample_refutes_nobody():
    """One sample 3x slow is a straggler's, not a refutation: a fleet measuring each config once
    must not distrust its honest members for it."""
    stragglers = [cell(("a", 100.0), ("b", 101.0), ("c", 300.0)) for _ in range(5)]
    assert distrusted_sources(stragglers) == frozenset()


def test_colluders_below_a_third_of_a_contexts_sources_cannot_confirm_each_other():
    collusion = cell(("liar-1", 10.0), ("liar-2", 10.0))
    assert collusion.corroborated(quorum=2)
    assert not collusion.corroborated(quorum=4), "10 sources report on the context: 2 is not a third"


def test_steady_fake_numbers_cannot_make_the_fabric_look_quiet():
    rng = random.Random(0)
    honest = [cell(*[(f"h{k}", 100.0 * math.exp(rng.gauss(0, 0.05))) for k in range(3) for _ in range(3)])
              for _ in range(20)]
    liar = [cell(*[("liar", 10.0)] * 9) for _ in range(200)]
    assert pooled_noise(honest + liar) == pytest.approx(pooled_noise(honest), rel=0.5)
    assert pooled_noise(honest + liar) > 0.02


def test_an_untrusted_config_or_default_is_never_recommended():
    context = Context(collective="allreduce", nbytes=1 << 20, nranks=16, nnodes=2)
    candidates = [NcclConfig(), NcclConfig(algo="ring", proto="simple")]
    default = Estimate(mean=math.log(100), std=0.01, samples=MIN_SAMPLES)
    fast = Estimate(mean=math.log(50), std=0.01, samples=MIN_SAMPLES)
    assert decide(context, candidates, [default, fast]).chosen == 1
    lone = Estimate(mean=math.log(50), std=0.01, samples=MIN_SAMPLES, trusted=False)
    assert decide(context, candidates, [default, lone]).chosen == 0
    doubtful_default = Estimate(mean=math.log(100), std=0.01, samples=MIN_SAMPLES, trusted=False)
    assert decide(context, candidates, [doubtful_default, fast]).chosen == 0


@pytest.mark.slow
@pytest.mark.parametrize("malicious", [1, 2])
def test_liars_in_a_fleet_of_ten_cause_no_slowdown(reliability, tmp_path, malicious):
    """Liars report the slowest valid config of every context as 10x faster, every round."""
    result = reliability.run_poisoning("h100-ib-2n", agents=10, malicious=malicious, rounds=12, sizes=5,
                                       seed=0, workdir=str(tmp_path))
    assert result.poisoned_recommended == 0
    assert result.worst_slowdown <= 1.02 and result.worst_env_slowdown <= 1.02, result


def test_the_same_attack_poisons_a_learner_that_trusts_every_sample(reliability, tmp_path):
    """The scenario above is a real attack: the coordinate-descent baseline (lowest median per
    context) recommends the liar's config and slows calls down."""
    result = reliability.run_poisoning("h100-ib-2n", agents=10, malicious=1, rounds=8, sizes=5, seed=0,
                                       workdir=str(tmp_path), learner="coordinate descent")
    assert result.poisoned_recommended > 0 and result.worst_slowdown > 2.0


def test_a_baseline_one_of_three_sources_found_slower_still_stands():
    """NCCL's default is never itself recommended, only compared against: a straggler's sample
    (or a liar's) among three sources cannot move its median, so it does not void every
    comparison on the context. A claimed config in the same position stays contested."""
    straggled = cell(("a", 100.0), ("b", 102.0), ("c", 160.0))
    assert straggled.corroborated(slower_contests=False)
    assert not straggled.corroborated(), "a claim one of three could not reproduce is contested"
    assert not cell(("a", 100.0), ("b", 160.0)).corroborated(slower_contests=False), "one against one"

"""The guard: the one place that decides "recommend, or keep NCCL's default".

Every tuner's recommendations (`decide`), the process-wide env (`forced_cost`)
and so the tuner-plugin rules, which are written only for decisions that
depart from the default, pass through here. The promise is "never slower
than NCCL's own choice", measured per call:

* A config is recommended only when the evidence says, with probability
  `CONFIDENCE`, that it beats the default by `MIN_GAIN`; both the default's
  and the config's evidence must be trusted (knowledge.py says what trusted
  means), the default measured `MIN_DEFAULT_SAMPLES` times (it is the
  baseline of every comparison), and the config `MIN_SAMPLES` times, or
  backed by evidence transferred from neighbouring sizes or a similar fabric.
* A process-wide setting forces configs on calls that no recommendation
  chose; each is priced at its pessimistic latency (`PESSIMISM` standard
  deviations above its mean), only on trusted evidence, and refused if that
  may slow the call by more than `MAX_CALL_LOSS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.special import ndtr  # the standard normal CDF (scipy.stats costs a second to import)

from dynamiccl.schemas import Context, NcclConfig
from dynamiccl.server.learner.base import Decision, Estimate

#: Probability that a recommended config beats the default, required to recommend it.
CONFIDENCE = 0.95
#: Smallest predicted gain (log scale) worth changing NCCL's choice for.
MIN_GAIN = math.log(1.01)
#: Samples of a config without transferred evidence before it is recommended.
MIN_SAMPLES = 3
#: Samples of the default, the baseline, before anything is recommended against it: of two that
#: disagree beyond noise its location is the lower, which a straggler cannot raise.
MIN_DEFAULT_SAMPLES = 2
#: Upper-bound factor (in standard deviations) for configs a process-wide setting forces on a call.
PESSIMISM = 1.645
#: Largest slowdown (pessimistic) a process-wide setting may cause to any one call.
MAX_CALL_LOSS = 1.02


def probability_of_gain(default: Estimate, candidate: Estimate) -> float:
    """P(candidate is faster than the default by at least MIN_GAIN)."""
    gain = default.mean - candidate.mean
    return float(ndtr((gain - MIN_GAIN) / math.hypot(default.std, candidate.std)))


def _eligible(estimate: Estimate) -> bool:
    return estimate.trusted and (estimate.samples >= MIN_SAMPLES or estimate.transferred)


def _baseline_ready(default: Estimate) -> bool:
    return default.trusted and default.samples >= MIN_DEFAULT_SAMPLES


def decide(context: Context, candidates: Sequence[NcclConfig], estimates: Sequence[Estimate]) -> Decision:
    """The fastest eligible candidate that confidently beats the default (index 0), else the
    default. Confidence is the probability of the chosen config's gain; for the default, that
    no candidate has one."""
    candidates, estimates = tuple(candidates), tuple(estimates)
    default = estimates[0]
    if not _baseline_ready(default):
        return Decision(context, candidates, estimates, 0, confidence=0.0)
    best, best_mean, best_probability, closest = 0, default.mean, 0.0, 0.0
    for index, estimate in enumerate(estimates[1:], start=1):
        if not _eligible(estimate):
            continue
        probability = probability_of_gain(default, estimate)
        closest = max(closest, probability)
        if probability >= CONFIDENCE and estimate.mean < best_mean:
            best, best_mean, best_probability = index, estimate.mean, probability
    if best:
        return Decision(context, candidates, estimates, best, confidence=best_probability)
    return Decision(context, candidates, estimates, 0, confidence=1.0 - closest)


def forced_cost(decision: Decision, config: NcclConfig) -> float:
    """Pessimistic latency (us) of running `config` on the decision's context because a
    process-wide setting makes NCCL run it; inf where that is unknown, untrusted or may cost
    more than MAX_CALL_LOSS over the default."""
    if config.is_default:  # candidates[0]
        return decision.default.latency_us
    estimate = decision.estimate_of(config)
    if estimate is None or not _eligible(estimate) or not _baseline_ready(decision.default):
        return math.inf
    cost = math.exp(estimate.mean + PESSIMISM * estimate.std)
    return cost if cost <= MAX_CALL_LOSS * decision.default.latency_us else math.inf

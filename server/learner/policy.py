"""Decisions from estimates: what to try next, and what is safe to recommend.

Both work on posterior log latencies (`Estimate`), so a difference of 0.01 is
about 1% of time.

*Suggest* explores a config only when what it may teach is worth what it may
cost: its expected improvement over the best known config, times the number
of future calls that would profit (`HORIZON`), must exceed its expected extra
time now. A config the evidence says is slow is never tried; a config the
model cannot rule out gets tried once, and tuning pays for itself.

*Recommend* keeps the NCCL default unless a measured config is faster with
high probability (`CONFIDENCE`) by a margin (`MIN_GAIN`), and both the
default's and the config's evidence are corroborated (more than one source, or
NCCL's model, backs them): one client's word never changes what others run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr  # the standard normal CDF (scipy.stats costs a second to import)

from dynamiccl.server.learner.knowledge import Estimate

SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Future uses of a context that an exploration's finding would speed up.
HORIZON = 25.0
#: Probability that a recommended config beats the default, required to recommend it.
CONFIDENCE = 0.95
#: Smallest predicted gain (log scale) worth changing NCCL's choice for.
MIN_GAIN = math.log(1.01)
#: Samples of a config in a context before it can be recommended there.
MIN_SAMPLES = 3
#: Samples of the NCCL default, the baseline of every comparison, before anything else is tried.
DEFAULT_SAMPLES = 5


@dataclass(frozen=True)
class Choice:
    index: int
    explore: bool


def expected_improvement(best: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(best - X, 0)] for X ~ N(mean, std), per candidate."""
    z = (best - mean) / std
    return (best - mean) * ndtr(z) + std * np.exp(-0.5 * z**2) / SQRT_2PI


def choose_suggestion(estimates: list[Estimate], rng: np.random.Generator) -> Choice:
    """Index 0 is the NCCL default; it is measured first (DEFAULT_SAMPLES times, so that one
    straggler cannot make everything else look fast), as the baseline everything is judged by."""
    if estimates[0].samples < DEFAULT_SAMPLES:
        return Choice(0, explore=False)
    mean = np.array([e.mean for e in estimates])
    std = np.array([e.std for e in estimates])
    measured = np.array([e.samples > 0 for e in estimates])
    best = int(np.flatnonzero(measured)[np.argmin(mean[measured])])
    value = HORIZON * expected_improvement(mean[best], mean, std) - np.maximum(mean - mean[best], 0.0)
    value[best] = 0.0
    top = float(value.max())
    if top <= 0.0:
        return Choice(_confirm(estimates, best), explore=False)
    ties = np.flatnonzero(value >= top - 1e-12)
    return Choice(int(rng.choice(ties)), explore=True)


def _confirm(estimates: list[Estimate], best: int) -> int:
    """Exploiting the best known config, or the default where the default is the less certain
    of the two and the gain is not yet confident enough to recommend: a gain that cannot be
    confirmed is never used."""
    default = estimates[0]
    if best == 0 or default.std <= estimates[best].std:
        return best
    return 0 if _probability_of_gain(default, estimates[best]) < CONFIDENCE else best


def _probability_of_gain(default: Estimate, candidate: Estimate) -> float:
    """P(candidate is faster than the default by at least MIN_GAIN)."""
    gain = default.mean - candidate.mean
    return float(ndtr((gain - MIN_GAIN) / math.hypot(default.std, candidate.std)))


@dataclass(frozen=True)
class Verdict:
    index: int
    confidence: float


def choose_recommendation(estimates: list[Estimate]) -> Verdict:
    """The fastest eligible config that confidently beats the default (index 0), else the default.

    Confidence is the probability that the config is faster than the default by MIN_GAIN."""
    default = estimates[0]
    if default.samples < MIN_SAMPLES or not default.corroborated:
        return Verdict(0, confidence=0.0)
    best, best_mean, best_probability, closest = 0, default.mean, 0.0, 0.0
    for index, estimate in enumerate(estimates[1:], start=1):
        eligible = estimate.samples >= MIN_SAMPLES or (estimate.samples == 0 and estimate.transferred)
        if not eligible or not estimate.corroborated:
            continue
        probability = _probability_of_gain(default, estimate)
        closest = max(closest, probability)
        if probability >= CONFIDENCE and estimate.mean < best_mean:
            best, best_mean, best_probability = index, estimate.mean, probability
    if best:
        return Verdict(best, confidence=best_probability)
    return Verdict(0, confidence=1.0 - closest)

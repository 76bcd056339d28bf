"""What to try next: value-of-information exploration over posterior estimates.

Works on posterior log latencies (`Estimate`), so a difference of 0.01 is
about 1% of time. A config is explored only when what it may teach is worth
what it may cost: its expected improvement over the best known config, times
the number of future calls that would profit (`HORIZON`), must exceed its
expected extra time now. A config the evidence says is slow is never tried;
a config the model cannot rule out gets tried once, and tuning pays for
itself. What is recommended is the guard's business (guard.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr  # the standard normal CDF (scipy.stats costs a second to import)

from dynamiccl.server.learner.base import Estimate
from dynamiccl.server.learner.guard import CONFIDENCE, probability_of_gain

SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Future uses of a context that an exploration's finding would speed up.
HORIZON = 25.0
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
    return 0 if probability_of_gain(default, estimates[best]) < CONFIDENCE else best


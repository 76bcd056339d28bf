"""Measurement noise: what a timing of `count` calls looks like on a shared cluster."""

from __future__ import annotations

import math

import numpy as np

#: Spread (log scale) of a single call; averaging `count` calls shrinks it by sqrt(count).
PER_CALL_SIGMA = 0.15
#: Spread that averaging never removes (clock resolution, run-to-run drift).
FLOOR_SIGMA = 0.015
#: Chance that a whole sample is spoiled by a straggler (a slow rank, a noisy neighbour).
STRAGGLER_PROBABILITY = 0.03
STRAGGLER_SLOWDOWN = (1.3, 3.0)


def noisy(true_us: float, count: int, rng: np.random.Generator) -> float:
    """A measured mean over `count` calls whose noiseless time is `true_us`."""
    sigma = math.hypot(PER_CALL_SIGMA / math.sqrt(count), FLOOR_SIGMA)
    measured = true_us * math.exp(rng.normal(0.0, sigma))
    if rng.random() < STRAGGLER_PROBABILITY:
        measured *= rng.uniform(*STRAGGLER_SLOWDOWN)
    return measured

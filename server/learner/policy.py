"""What to try next: value-of-information exploration over posterior estimates.

Works on posterior log latencies (`Estimate`), so a difference of 0.01 is
about 1% of time. A config is explored only when what it may teach is worth
what it may cost: its expected improvement over the best known config, times
the number of future calls that would profit (`HORIZON`), must exceed its
expected extra time now. A config the evidence says is slow is never tried;
a config the model cannot rule out gets tried once, and tuning pays for
itself. A new best config is confirmed (measured again, with the default
where that is the less certain) until the guard can recommend it, before
any trial that may gain less than it: one that may gain more goes first.
NCCL's model alone speaks for a pair nobody measured near a size; it is
given the uncertainty the fabric's measurements show it has (`novel_std`).
What is recommended is the guard's business (guard.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr  # the standard normal CDF (scipy.stats costs a second to import)

from dynamiccl.server.learner.base import Estimate
from dynamiccl.server.learner.guard import MIN_DEFAULT_SAMPLES, MIN_SAMPLES, probability_of_gain

SQRT_2PI = math.sqrt(2.0 * math.pi)
#: Future uses of a context that an exploration's finding would speed up.
HORIZON = 25.0
#: Samples of the best config worth taking to confirm its gain before exploring further (once
#: nothing is worth exploring, the less certain of it and the default is measured until confirmed).
CONFIRM_SAMPLES = 8
#: Probability of its gain at which a best config counts as confirmed: above the guard's
#: CONFIDENCE, so that the next samples do not take back the recommendation.
CONFIRMED = 0.99
#: How far (log scale) NCCL's model may be off for an (algorithm, protocol) nobody measured near
#: a size, before a fabric's own measurements tell (`knowledge.model_error`): per effect,
#: clusters depart from it by up to 2-3x.
NOVEL_STD = 0.5


@dataclass(frozen=True)
class Choice:
    index: int
    explore: bool


@dataclass(frozen=True)
class Plan:
    """What to try in one context, decided once per snapshot of the evidence: one of `indices`
    (several only where exploration values them alike: `choose` draws among them), and, for the
    caller's budget of novel trials, `novel_trial` when the context is `settled`."""

    indices: tuple[int, ...]
    explore: bool
    settled: bool
    novel: tuple[int, float] | None

    def choose(self, rng: np.random.Generator) -> Choice:
        """An exploring plan draws (a seeded `rng` makes replicas draw alike). The draw is
        `rng.choice(indices)`'s, without its conversion of the tuple to an array (12 us a call)."""
        if not self.explore:
            return Choice(self.indices[0], False)
        return Choice(self.indices[int(rng.integers(len(self.indices)))], True)


def expected_improvement(best: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """E[max(best - X, 0)] for X ~ N(mean, std), per candidate."""
    z = (best - mean) / std
    return (best - mean) * ndtr(z) + std * np.exp(-0.5 * z**2) / SQRT_2PI


def plan(estimates: Sequence[Estimate], novel_std: float = NOVEL_STD) -> Plan:
    """The context's plan. Index 0 is the NCCL default; it is measured first (MIN_DEFAULT_SAMPLES
    times, so that one straggler cannot make everything else look fast, and until its evidence
    is trusted), as the baseline everything is judged by. Then the most valuable exploration,
    unless confirming the best measured config is worth more (`_confirmation_at_stake`) or
    nothing is worth its cost; the context is settled (a novel trial may go there) when some
    trial, novel or not, is worth more than the confirmation."""
    if _baseline_pending(estimates[0]):
        return Plan((0,), False, False, None)
    mean = np.array([e.mean for e in estimates])
    std = np.array([e.std for e in estimates])
    best = _best_measured(estimates)
    value = HORIZON * expected_improvement(mean[best], mean, std) - np.maximum(mean - mean[best], 0.0)
    value[best] = 0.0
    top = float(value.max())
    novel = novel_trial(estimates, novel_std)
    at_stake = _confirmation_at_stake(estimates, best)
    settled = max(top, novel[1] if novel else 0.0) > at_stake
    offered = novel if settled else None
    if top <= at_stake:
        return Plan((_confirm(estimates, best),), False, settled, offered)
    return Plan(tuple(int(i) for i in np.flatnonzero(value >= top - 1e-12)), True, settled, offered)


def _confirmation_at_stake(estimates: Sequence[Estimate], best: int) -> float:
    """What confirming the best measured config may still be worth, in the units of an
    exploration's value: while it is unconfirmed, its whole gain over the default for HORIZON
    calls (a gain not confirmed is never recommended); else nothing, so that any trial worth
    its cost goes first. A trial that may gain more goes before the confirmation, which only
    waits: a 3% gain being confirmed does not hold back a config that may be twice as fast."""
    if not best or not _unconfirmed(estimates[0], estimates[best]):
        return 0.0
    return HORIZON * (estimates[0].mean - estimates[best].mean)  # best is the fastest measured


def _baseline_pending(default: Estimate) -> bool:
    """Whether the default needs measuring before anything else: MIN_DEFAULT_SAMPLES times, and
    again (up to CONFIRM_SAMPLES) while its evidence is not trusted (one straggler among a
    fleet's samples contests it), since nothing is recommended against an untrusted baseline."""
    return default.samples < MIN_DEFAULT_SAMPLES or (not default.trusted and default.samples < CONFIRM_SAMPLES)


def _best_measured(estimates: Sequence[Estimate]) -> int:
    """The index of the fastest config with samples of its own (the default has some first)."""
    return min((i for i, e in enumerate(estimates) if e.samples > 0), key=lambda i: estimates[i].mean)


def novel_trial(estimates: Sequence[Estimate], novel_std: float = NOVEL_STD) -> tuple[int, float] | None:
    """The most valuable config of an (algorithm, protocol) never measured at this size, with
    NCCL's model given its real uncertainty (`novel_std`, how far it is off on the fabric where
    pairs were measured): (index, value), or None when none is
    worth its cost. The prior orders what is tried; it forbids nothing it could be wrong about.
    The caller spends such trials sparingly (one a round per context group: what one teaches
    the surrogate carries to the neighbouring sizes)."""
    novel = [i for i, e in enumerate(estimates) if e.novel]
    if not novel:
        return None
    best = estimates[_best_measured(estimates)].mean
    mean = np.array([estimates[i].mean for i in novel])
    std = np.hypot([estimates[i].std for i in novel], novel_std)
    value = HORIZON * expected_improvement(best, mean, std) - np.maximum(mean - best, 0.0)
    top = int(np.argmax(value))
    return (novel[top], float(value[top])) if value[top] > 0 else None


def _unconfirmed(default: Estimate, incumbent: Estimate) -> bool:
    """Whether the best measured config needs measuring again (or the default, see `_confirm`)
    before anything else is explored: it costs nothing (it is the best known), and a gain not
    confirmed is never recommended. Bounded by CONFIRM_SAMPLES, so a gain too small to confirm
    does not stop exploration for good."""
    if incumbent.samples < MIN_SAMPLES or not incumbent.trusted:
        return incumbent.samples < CONFIRM_SAMPLES
    fewest = min(default.samples, incumbent.samples)
    return probability_of_gain(default, incumbent) < CONFIRMED and fewest < CONFIRM_SAMPLES


def _confirm(estimates: Sequence[Estimate], best: int) -> int:
    """Exploiting the best known config, or the default where the default is the less certain
    of the two and the gain is not yet confirmed: a gain that cannot be confirmed is never
    used."""
    default = estimates[0]
    if best == 0 or default.std <= estimates[best].std:
        return best
    return 0 if probability_of_gain(default, estimates[best]) < CONFIRMED else best


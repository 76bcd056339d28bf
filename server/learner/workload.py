"""From per-context recommendations to what a job is launched with.

* `choose_env`: the one process-wide NCCL setting (per-collective algorithm and
  protocol, one channel count) that minimises the weighted predicted time of
  the job's calls, as NCCL would apply it. Configs a setting makes NCCL run
  are judged pessimistically (upper bound) unless they are what NCCL runs
  anyway, never on measurements no second source corroborates, and a setting that may slow any call by more than `MAX_CALL_LOSS`
  is refused: never worse than the default, for the workload or for a call.
* `tuner_rules`: per-size rules for the tuner plugin, one per recommended
  context, adjacent sizes with the same choice merged. Every rule names the
  config in full (what NCCL would pick, where the recommendation leaves it to
  NCCL): with NCCL's example plugin loaded, a call no rule matches, or a rule
  with channels -1, runs on one channel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from itertools import groupby

from dynamiccl.nccl.env import EnvSetting, render_env
from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.nccl.tuner_rules import RULE_COLLECTIVES, TunerRule
from dynamiccl.schemas import Collective, Context, NcclConfig
from dynamiccl.server.learner.knowledge import Snapshot
from dynamiccl.server.learner.policy import MIN_GAIN

#: Upper-bound factor (in standard deviations) for configs a setting forces on a call.
PESSIMISM = 1.645
#: Largest slowdown (pessimistic) a process-wide setting may cause to any one call.
MAX_CALL_LOSS = 1.02
MAX_BYTES = (1 << 63) - 1


def choose_env(
    snapshot: Snapshot,
    contexts: Sequence[Context],
    weights: Sequence[float],
    recommended: Sequence[NcclConfig],
) -> dict[str, str]:
    """Coordinate descent over per-collective (algo, proto) pairs and the channel count."""
    prior = snapshot.prior
    defaults = [prior.resolve(c, NcclConfig()) for c in contexts]
    default_cost = snapshot.estimates([(c, [NcclConfig()]) for c in contexts])
    baseline = [math.exp(e[0].mean) for e in default_cost]

    pairs: dict[Collective, set[tuple]] = {}
    channel_options: set[int] = set()
    for context, config in zip(contexts, recommended):
        if config.algo is not None and config.proto is not None:
            pairs.setdefault(context.collective, set()).add((config.algo, config.proto))
        if config.nchannels is not None and not context.collective.is_p2p:
            channel_options.add(config.nchannels)
    if not pairs and not channel_options:
        return {}

    cache: dict[tuple[int, NcclConfig], float] = {}

    def total(setting: EnvSetting) -> float:
        """Weighted pessimistic time of the workload under `setting`; inf if it may hurt a call."""
        env = render_env(setting)
        try:
            runs = [(i, prior.resolve_env(context, env)) for i, context in enumerate(contexts)]
        except InvalidConfig:  # NCCL would fail a call: nothing it could run is left allowed
            return math.inf
        forced = [(i, config) for i, config in runs if config != defaults[i]]
        unknown = [(i, config) for i, config in forced if (i, config) not in cache]
        if unknown:
            estimates = snapshot.estimates([(contexts[i], [config]) for i, config in unknown])
            for key, (estimate,) in zip(unknown, estimates):
                # measurements no second source backs are no ground to force a config on a call
                doubtful = estimate.samples > 0 and not estimate.corroborated
                cache[key] = math.inf if doubtful else math.exp(estimate.mean + PESSIMISM * estimate.std)
        if any(cache[(i, config)] > MAX_CALL_LOSS * baseline[i] for i, config in forced):
            return math.inf
        changed = {i: cache[(i, config)] for i, config in forced}
        return sum(w * changed.get(i, baseline[i]) for i, w in enumerate(weights))

    best = EnvSetting()
    best_cost = base_cost = total(best)
    for _ in range(2):
        for collective, options in sorted(pairs.items()):
            for algo, proto in sorted(options):
                trial = EnvSetting(
                    algos={**best.algos, collective: algo},
                    protos={**best.protos, collective: proto},
                    nchannels=best.nchannels,
                )
                if (cost := total(trial)) < best_cost:
                    best, best_cost = trial, cost
        for channels in sorted(channel_options):
            trial = EnvSetting(algos=best.algos, protos=best.protos, nchannels=channels)
            if (cost := total(trial)) < best_cost:
                best, best_cost = trial, cost
    if base_cost <= 0 or math.log(base_cost / best_cost) < MIN_GAIN:
        return {}
    return render_env(best)


def tuner_rules(
    contexts: Sequence[Context],
    recommended: Sequence[NcclConfig],
    resolve: Callable[[Context, NcclConfig], NcclConfig],
) -> list[TunerRule]:
    """One rule per size range; each recommended size owns up to the geometric midpoints to its
    neighbours, so sizes between two measured ones follow the nearer (in log scale)."""
    rows = sorted(
        (
            (c.collective, c.nnodes, c.nranks, c.nbytes, resolve(c, config))
            for c, config in zip(contexts, recommended)
            if c.collective in RULE_COLLECTIVES and c.nranks > 1
        ),
        key=lambda row: (RULE_COLLECTIVES.index(row[0]), row[1], row[2], row[3]),
    )
    rules: list[TunerRule] = []
    for (collective, nnodes, nranks), group in groupby(rows, key=lambda r: r[:3]):
        sized = [(nbytes, config) for *_, nbytes, config in group]
        sized = [s for i, s in enumerate(sized) if i == 0 or s[0] != sized[i - 1][0]]
        for i, (nbytes, config) in enumerate(sized):
            low = 0 if i == 0 else math.isqrt(sized[i - 1][0] * nbytes) + 1
            high = MAX_BYTES if i == len(sized) - 1 else math.isqrt(nbytes * sized[i + 1][0])
            rule = TunerRule(collective, low, high, config.algo, config.proto, config.nchannels, nnodes, nranks)
            previous = rules[-1] if rules else None
            if (
                previous is not None
                and (previous.collective, previous.nnodes, previous.nranks) == (collective, nnodes, nranks)
                and previous.config == config
                and previous.max_bytes + 1 == low
            ):
                rule = dataclasses.replace(previous, max_bytes=high)
                rules.pop()
            rules.append(rule)
    return rules

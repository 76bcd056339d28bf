"""From decisions to what a job is given: per-context recommendations, one process-wide env,
and per-size rules for DynamICCL's tuner plugin. The same for every tuner.

* `choose_env`: per collective, the (algorithm, protocol) pair that minimises
  the weighted pessimistic time of the job's calls of that collective, as
  NCCL runs them under `NCCL_ALGO` / `NCCL_PROTO`: every call of the
  collective then runs that pair on NCCL's own channel count, a config each
  decision has evidence for (`guard.forced_cost`). No channel count is set
  process-wide: NCCL would apply it to every call and thin it for small ones,
  which no measurement of a single config describes. Point-to-point calls
  share `NCCL_P2P_NCHANNELS` the same way. A setting that may slow any call
  by more than the guard allows, or that gains less than `MIN_GAIN` for its
  collective, is not set.
* `tuner_rules`: a rule only where a decision departs from NCCL's default,
  spelling out only what the decision fixes (channels -1 where it leaves them
  to NCCL). DynamICCL's plugin leaves every call no rule matches to NCCL, so
  the server never writes down a guess of what NCCL would pick. Each rule
  covers its size up to the geometric midpoints to the neighbouring sizes
  the job asked about (whatever was decided for them), and an octave beyond
  the smallest and the largest; adjacent rules with the same config merge.
  (NCCL's example plugin runs unmatched calls on one channel: these rules are
  not meant for it.)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from dynamiccl.nccl.env import EnvSetting, render_env
from dynamiccl.nccl.tuner_rules import RULE_COLLECTIVES, TunerRule, render_rules
from dynamiccl.schemas import (
    DEFAULT_CONFIG,
    Algo,
    Collective,
    NcclConfig,
    Proto,
    RecommendResponse,
    WeightedContext,
)
from dynamiccl.server.learner.base import Decision
from dynamiccl.server.learner.guard import MIN_GAIN

MAX_BYTES = (1 << 63) - 1
_P2P = "p2p"  # the calls NCCL_P2P_NCHANNELS sets


def respond(contexts: Sequence[WeightedContext], decisions: Sequence[Decision]) -> RecommendResponse:
    """The /v1/recommend body for these contexts, from one decision per context."""
    return RecommendResponse(
        recommendations=[d.recommendation for d in decisions],
        env=choose_env([c.weight for c in contexts], decisions),
        tuner_config=render_rules(tuner_rules(decisions)),
    )


def _group(decision: Decision) -> Collective | str:
    return _P2P if decision.context.collective.is_p2p else decision.context.collective


def _env_option(group: Collective | str, config: NcclConfig) -> tuple[str, str, int] | None:
    """The key of what a process-wide setting can take from a departing config: a collective's
    pair, or the point-to-point channel count (None: nothing it could set)."""
    if group == _P2P:
        return ("", "", config.nchannels) if config.nchannels else None
    if config.algo is None or config.proto is None:
        return None
    return (config.algo, config.proto, 0)


def choose_env(weights: Sequence[float], decisions: Sequence[Decision]) -> dict[str, str]:
    groups: dict[Collective | str, list[int]] = defaultdict(list)
    for i, decision in enumerate(decisions):
        if decision.context.nranks > 1:
            groups[_group(decision)].append(i)
    algos, protos, p2p_channels = {}, {}, None
    for group, members in groups.items():
        options = {_env_option(group, decisions[i].config) for i in members if decisions[i].departs} - {None}

        def total(option: tuple[str, str, int]) -> float:
            """Weighted pessimistic time of the group's calls with `option` set (the default: nothing)."""
            return sum(weights[i] * decisions[i].forced_cost(option) for i in members)

        base = total(DEFAULT_CONFIG.key())
        best, best_cost = None, base
        for option in sorted(options):
            if (cost := total(option)) < best_cost:
                best, best_cost = option, cost
        if best is None or not math.isfinite(base) or base <= 0 or math.log(base / best_cost) < MIN_GAIN:
            continue
        algo, proto, channels = best
        if group == _P2P:
            p2p_channels = channels
        else:
            algos[group], protos[group] = Algo(algo), Proto(proto)
    return render_env(EnvSetting(algos=algos, protos=protos, p2p_nchannels=p2p_channels))


def tuner_rules(decisions: Sequence[Decision]) -> list[TunerRule]:
    """Rules for the decisions that depart from NCCL's default (see the module docstring)."""
    shapes: dict[tuple[int, int, int], dict[int, Decision]] = defaultdict(dict)
    for decision in decisions:
        c = decision.context
        if c.collective in RULE_COLLECTIVES and c.nranks > 1:
            shapes[(RULE_COLLECTIVES.index(c.collective), c.nnodes, c.nranks)].setdefault(c.nbytes, decision)
    rules: list[TunerRule] = []
    for (collective_index, nnodes, nranks), by_size in sorted(shapes.items()):
        spans: list[list] = []  # [low, high, (algo, proto, channels)], adjacent equal configs merged
        sizes = sorted(by_size)
        for i, nbytes in enumerate(sizes):
            config = by_size[nbytes].config
            if config.algo is None or config.proto is None:
                continue  # NCCL's own choice: no rule
            low = nbytes // 2 if i == 0 else math.isqrt(sizes[i - 1] * nbytes) + 1
            high = min(MAX_BYTES, 2 * nbytes + 1) if i == len(sizes) - 1 else math.isqrt(nbytes * sizes[i + 1])
            setting = (config.algo, config.proto, config.nchannels)
            if spans and spans[-1][2] == setting and spans[-1][1] + 1 == low:
                spans[-1][1] = high
            else:
                spans.append([low, high, setting])
        rules += [TunerRule(RULE_COLLECTIVES[collective_index], low, high, algo, proto, channels, nnodes, nranks)
                  for low, high, (algo, proto, channels) in spans]
    return rules

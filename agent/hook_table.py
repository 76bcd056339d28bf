"""In-process aggregation of timed calls, and their conversion to Measurements.

The training thread (and gloo / NCCL callback threads) only add `(key,
seconds)` to a dict under a lock; building pydantic Contexts, resolving the
NCCL config in force and serialising happen on the sender thread at flush.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from dynamiccl.nccl.env import EnvSetting, parse_env
from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.nccl.tuner_rules import TunerRule, first_match, parse_rules
from dynamiccl.schemas import DEFAULT_CONFIG, Collective, Context, Measurement, NcclConfig


class CallKey(NamedTuple):
    collective: Collective
    nbytes: int
    nranks: int
    nnodes: int
    nccl: bool  # False: gloo (or any non-NCCL backend), whose config is recorded as all-null


class CallTable:
    """count and summed seconds per CallKey; `take()` hands the window over and starts a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cells: dict[CallKey, list[float]] = {}

    def add(self, key: CallKey, seconds: float) -> None:
        with self._lock:
            cell = self._cells.get(key)
            if cell is None:
                self._cells[key] = [1, seconds]
            else:
                cell[0] += 1
                cell[1] += seconds

    def take(self) -> dict[CallKey, list[float]]:
        with self._lock:
            cells, self._cells = self._cells, {}
        return cells


@dataclass
class ConfigResolver:
    """The NCCL config in force for a call, read once from the process environment.

    NCCL reads its variables at communicator init (numeric ones once per
    process), so the launch environment is what ran. With the tuner plugin
    loaded and a rule file named, the first matching rule decides per call.
    `error` is set when the environment holds something that is not one
    config (a list, an exclusion): NCCL calls are then not attributed to any
    config rather than mislabelled.
    """

    setting: EnvSetting | None
    rules: list[TunerRule]
    error: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConfigResolver:
        env = os.environ if env is None else env
        rules: list[TunerRule] = []
        try:
            setting = parse_env(env)
            if env.get("NCCL_TUNER_PLUGIN") and env.get("NCCL_TUNER_CONFIG_FILE"):
                with open(env["NCCL_TUNER_CONFIG_FILE"], encoding="utf-8") as handle:
                    rules = parse_rules(handle.read())
        except (InvalidConfig, OSError) as error:
            return cls(setting=None, rules=[], error=str(error))
        return cls(setting=setting, rules=rules, error=None)

    def config(self, context: Context) -> NcclConfig:
        assert self.setting is not None
        rule = first_match(self.rules, context)
        if rule is not None:
            return rule.config
        coll = context.collective
        if coll.is_p2p:
            return NcclConfig(nchannels=self.setting.p2p_nchannels)
        return NcclConfig(
            algo=self.setting.algos.get(coll),
            proto=self.setting.protos.get(coll),
            nchannels=self.setting.nchannels,
        )


def to_measurements(
    cells: Mapping[CallKey, list[float]], resolver: ConfigResolver, job_id: str | None
) -> tuple[list[dict[str, Any]], int]:
    """JSON-ready measurements for the local API, and how many cells could not be attributed."""
    now = time.time()
    out: list[dict[str, Any]] = []
    skipped = 0
    for key, (count, seconds) in cells.items():
        if seconds <= 0 or (key.nccl and resolver.setting is None):
            skipped += 1
            continue
        try:
            context = Context(
                collective=key.collective, nbytes=key.nbytes, nranks=key.nranks, nnodes=key.nnodes
            )
            config = resolver.config(context) if key.nccl else DEFAULT_CONFIG
            measurement = Measurement(
                context=context, config=config, latency_us=seconds / count * 1e6,
                count=int(count), source="torch", job_id=job_id, ts=now,
            )
        except ValueError:
            skipped += 1
            continue
        out.append(measurement.model_dump(mode="json", exclude_none=True))
    return out, skipped

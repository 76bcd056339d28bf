"""In-process aggregation of timed calls, and their conversion to Measurements.

The training thread (and gloo / NCCL callback threads) only add `(key,
seconds)` to a dict under a lock; building pydantic Contexts, resolving the
NCCL config in force and serialising happen on the sender thread at flush.

With DynamICCL's tuner plugin loaded, the rules in force change inside the
job, so NCCL calls are attributed to what the plugin reports it ran in this
process (`PluginAttribution`), never to the launch environment.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dynamiccl.agent.plugin.report import CommReport, PluginReport, parse_report
from dynamiccl.agent.plugin.rules import Section, is_own_plugin, parse_schedule
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


Attribution = tuple[NcclConfig, str | None]  # the config that ran, and the suggestion it carried out
Attribute = Callable[[Context], Attribution | None]  # None: not attributable to one config


def _size_log2(nbytes: int) -> int:
    return max(nbytes, 1).bit_length() - 1  # the plugin's size classes (see report.Choice)


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
    plugin: PluginAttribution | None = None  # DynamICCL's plugin loaded: its reports decide

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConfigResolver:
        env = os.environ if env is None else env
        rules: list[TunerRule] = []
        plugin = env.get("NCCL_TUNER_PLUGIN", "")
        rules_file = env.get("NCCL_TUNER_CONFIG_FILE", "")
        try:
            setting = parse_env(env)
            if plugin and rules_file and is_own_plugin(plugin):
                return cls(setting=setting, rules=[], error=None, plugin=PluginAttribution(Path(rules_file)))
            if plugin and rules_file:
                with open(rules_file, encoding="utf-8") as handle:
                    rules = parse_rules(handle.read())
        except (InvalidConfig, OSError) as error:
            return cls(setting=None, rules=[], error=str(error))
        return cls(setting=setting, rules=rules, error=None)

    def for_window(self, cells: Mapping[CallKey, list[float]]) -> Attribute:
        """How to attribute the NCCL calls of one window (`cells`, just taken from the table)."""
        if self.plugin is not None:
            return self.plugin.window(cells)
        return lambda context: (self.config(context), None)

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


@dataclass
class PluginAttribution:
    """Attributes a window's NCCL calls to what DynamICCL's tuner plugin reported running.

    The plugin rewrites `<rules file>.chosen.<pid>.json` at most every
    DYNAMICCL_TUNER_REPORT_MS: per communicator the rules version in force
    and, per (collective, log2 size class), its last choice and how many
    calls in a row made it. A window's calls of one context are attributed
    to that choice only when nothing can have changed it during the window:
    - every communicator of the context's shape kept its version between
      the report read at the window's start and the one read at its end
      (versions only grow), and no section of the schedule switches within
      one more window's worth of its calls after the report (a switch the
      report is too old to show);
    - the choices of those communicators agree, and their runs cover the
      window's calls of that size class (sizes of one class that ran under
      different rules break the run).
    Otherwise the calls are counted as unattributed: a window that straddles
    a switch, the first window of a communicator, and everything while the
    plugin writes no report. The suggestion id is the one the matching rule
    of the section in force carries, when that rule is what ran.
    """

    rules_file: Path
    _previous: dict[int, CommReport] = field(default_factory=dict)
    _schedule_key: tuple[int, int, int] | None = None
    _sections: list[Section] = field(default_factory=list)

    def report_path(self) -> Path:
        return self.rules_file.parent / f"{self.rules_file.name}.chosen.{os.getpid()}.json"

    def _report(self) -> PluginReport | None:
        path = self.report_path()
        try:
            return parse_report(path, path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _schedule(self) -> list[Section]:
        """The rules file's sections, re-parsed only when the file changed (kept when it breaks)."""
        try:
            st = self.rules_file.stat()
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if key != self._schedule_key:
                self._sections = parse_schedule(self.rules_file.read_text(encoding="utf-8"))
                self._schedule_key = key
        except (OSError, UnicodeDecodeError, InvalidConfig):
            pass
        return self._sections

    def window(self, cells: Mapping[CallKey, list[float]]) -> Attribute:
        report = self._report()
        previous = self._previous
        self._previous = {comm.ctx: comm for comm in report.comms} if report else {}
        if report is None:
            return lambda context: None
        sections = self._schedule()
        demand: Counter[tuple[Collective, int, int, int]] = Counter()
        for key, (count, _) in cells.items():
            if key.nccl:
                demand[key.collective, _size_log2(key.nbytes), key.nranks, key.nnodes] += int(count)

        def attribute(context: Context) -> Attribution | None:
            configs: set[NcclConfig] = set()
            run, version = 0, None
            for comm in report.comms:
                if (comm.nranks, comm.nnodes) != (context.nranks, context.nnodes):
                    continue
                choice = comm.choice_for(context.collective, context.nbytes)
                if choice is None:
                    continue
                before = previous.get(comm.ctx)
                if before is None or before.version != comm.version or _switch_near(sections, comm, before):
                    return None
                if choice.version != comm.version:
                    continue  # its last call of this class predates its version: not in this window
                configs.add(choice.config)
                run += choice.calls
                version = comm.version
            wanted = demand[context.collective, _size_log2(context.nbytes), context.nranks, context.nnodes]
            if len(configs) != 1 or run < wanted:
                return None
            config = configs.pop()
            return config, _suggestion_id(sections, version, context, config)

        return attribute


def _switch_near(sections: list[Section], comm: CommReport, before: CommReport) -> bool:
    """Whether a section newer than the one in force starts within one more window of the comm's calls."""
    pace = max(comm.calls - before.calls, 0)
    return any(s.from_call <= comm.calls + pace for s in sections
               if comm.version is None or s.version > comm.version)


def _suggestion_id(sections: list[Section], version: int | None, context: Context,
                   config: NcclConfig) -> str | None:
    section = next((s for s in sections if s.version == version), None)
    if section is None:
        return None
    index = next((i for i, rule in enumerate(section.rules) if rule.matches(context)), None)
    if index is None or section.rules[index].config != config:
        return None
    return section.suggestion_id(index)


def to_measurements(
    cells: Mapping[CallKey, list[float]], resolver: ConfigResolver, job_id: str | None
) -> tuple[list[dict[str, Any]], int]:
    """JSON-ready measurements for the local API, and how many cells could not be attributed."""
    now = time.time()
    out: list[dict[str, Any]] = []
    skipped = 0
    attribute = resolver.for_window(cells)
    for key, (count, seconds) in cells.items():
        if seconds <= 0 or (key.nccl and resolver.setting is None):
            skipped += 1
            continue
        try:
            context = Context(
                collective=key.collective, nbytes=key.nbytes, nranks=key.nranks, nnodes=key.nnodes
            )
            attribution = attribute(context) if key.nccl else (DEFAULT_CONFIG, None)
            if attribution is None:
                skipped += 1
                continue
            config, suggestion_id = attribution
            measurement = Measurement(
                context=context, config=config, latency_us=seconds / count * 1e6,
                count=int(count), source="torch", job_id=job_id, ts=now, suggestion_id=suggestion_id,
            )
        except ValueError:
            skipped += 1
            continue
        out.append(measurement.model_dump(mode="json", exclude_none=True))
    return out, skipped

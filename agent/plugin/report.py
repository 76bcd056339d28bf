"""What DynamICCL's tuner plugin actually chose, read from its per-process report files.

Each process with the plugin loaded rewrites `<rules file>.chosen.<pid>.json`
(at most every DYNAMICCL_TUNER_REPORT_MS, and at communicator finalize): per
communicator its call count, the rules version in force, how often it saw a
switch late and, per (collective, log2 size class), the last choice and for
how many calls in a row it was made. Measurements use it to label a timing
with the configuration that ran rather than the one that was asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dynamiccl.schemas import Algo, Collective, Context, NcclConfig, Proto

REPORT_GLOB = ".chosen.*.json"


@dataclass(frozen=True)
class Choice:
    collective: Collective
    size_log2: int  # calls of 2**size_log2 to 2**(size_log2+1)-1 bytes (0 also holds 0 bytes)
    source: Literal["rule", "nccl"]
    algo: Algo | None  # for source "nccl": the cheapest pair in NCCL's cost table, NCCL's own pick
    proto: Proto | None
    nchannels: int | None  # None: NCCL's channel count
    version: int | None  # rules version in force (None: no rules)
    calls: int  # consecutive calls with this choice, up to the report

    @property
    def config(self) -> NcclConfig:
        """The configuration DynamICCL set: NCCL's default where NCCL decided."""
        if self.source == "nccl":
            return NcclConfig()
        return NcclConfig(algo=self.algo, proto=self.proto, nchannels=self.nchannels)

    def covers(self, nbytes: int) -> bool:
        return (max(nbytes, 1).bit_length() - 1) == self.size_log2


@dataclass(frozen=True)
class CommReport:
    ctx: int  # the plugin's serial for this communicator in its process
    comm_id: str | None  # NCCL's communicator id (tuner API v5+)
    nranks: int
    nnodes: int
    calls: int
    version: int | None
    late: int  # sections first seen after their from_call had passed
    finalized: bool
    choices: tuple[Choice, ...]

    def choice_for(self, collective: Collective, nbytes: int) -> Choice | None:
        return next((c for c in self.choices if c.collective is collective and c.covers(nbytes)), None)


@dataclass(frozen=True)
class PluginReport:
    path: Path
    pid: int
    time_unix_ms: int
    comms: tuple[CommReport, ...]


def _choice(raw: dict[str, Any]) -> Choice:
    return Choice(
        collective=Collective(raw["collective"]),
        size_log2=int(raw["size_log2"]),
        source=raw["source"],
        algo=Algo(raw["algo"]) if raw.get("algo") else None,
        proto=Proto(raw["proto"]) if raw.get("proto") else None,
        nchannels=raw.get("channels"),
        version=raw.get("version"),
        calls=int(raw["calls"]),
    )


def _comm(raw: dict[str, Any]) -> CommReport:
    return CommReport(
        ctx=int(raw["ctx"]), comm_id=raw.get("comm_id"), nranks=int(raw["nranks"]),
        nnodes=int(raw["nnodes"]), calls=int(raw["calls"]), version=raw.get("version"),
        late=int(raw["late"]), finalized=bool(raw["finalized"]),
        choices=tuple(_choice(c) for c in raw["choices"]),
    )


def parse_report(path: Path, text: str) -> PluginReport:
    raw = json.loads(text)
    return PluginReport(path=path, pid=int(raw["pid"]), time_unix_ms=int(raw["time_unix_ms"]),
                        comms=tuple(_comm(c) for c in raw["comms"]))


def report_paths(rules_file: Path) -> list[Path]:
    return sorted(rules_file.parent.glob(rules_file.name + REPORT_GLOB))


def read_reports(rules_file: Path) -> list[PluginReport]:
    """Every process's report next to `rules_file`; a file that vanished or does not parse is skipped."""
    reports = []
    for path in report_paths(rules_file):
        try:
            reports.append(parse_report(path, path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return reports


def remove_reports(rules_file: Path) -> None:
    for path in report_paths(rules_file):
        path.unlink(missing_ok=True)


def config_that_ran(reports: Iterable[PluginReport], context: Context) -> NcclConfig | None:
    """The configuration last applied to calls like `context` (None: no such call reported)."""
    for report in reports:
        for comm in report.comms:
            if (comm.nranks, comm.nnodes) != (context.nranks, context.nnodes):
                continue
            choice = comm.choice_for(context.collective, context.nbytes)
            if choice is not None:
                return choice.config
    return None

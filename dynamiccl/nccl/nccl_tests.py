"""nccl-tests output (all_reduce_perf, all_gather_perf, ...) read as Measurements.

The format is what nccl-tests prints (src/util.cu): `# Collective test starting:
<program>`, `# nThread .. iters: N ..`, one `#  Rank r Group g Pid p on HOST
device d [bus] NAME` line per rank, then one row per size:

    size  count  type  redop  root  time algbw busbw #wrong  time algbw busbw #wrong

with the out-of-place figures first and the in-place ones second (either may be
blank in trace-replay output, `#wrong` may be `N/A`). `size` is the total
message size, as API.md's `nbytes` counts it (the gathered total for
allgather, the input for reducescatter). Each row gives up to two
measurements (out-of-place, in-place) of `iters` calls each; a half whose
`#wrong` is above 0 measured a broken run and is dropped. A row repeated
(`-N`, or several runs in one file) is several measurements.

The config that ran is NCCL's default unless the run forced one: given
explicitly, or read from NCCL's own log lines when the run had NCCL_DEBUG=INFO
(`NCCL_ALGO set by environment to Ring`), through `env.read_env`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dynamiccl.nccl.env import read_env
from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.schemas import Collective, Context, Measurement, NcclConfig

#: nccl-tests' program names, by the collective they time.
PROGRAMS: dict[str, Collective] = {
    "all_reduce_perf": Collective.allreduce,
    "all_gather_perf": Collective.allgather,
    "reduce_scatter_perf": Collective.reducescatter,
    "broadcast_perf": Collective.broadcast,
    "reduce_perf": Collective.reduce,
    "alltoall_perf": Collective.alltoall,
    "sendrecv_perf": Collective.sendrecv,
}

_PROGRAM = re.compile(r"^# Collective test starting: (\S+)")
_ITERS = re.compile(r"^# nThread .*warmup iters: \d+ iters: (\d+)")
_RANK = re.compile(r"^#\s+Rank\s+(\d+)\s+Group\s+\d+\s+Pid\s+\d+\s+on\s+(\S+)\s+device")
_ENV = re.compile(r"\b(NCCL_[A-Z0-9_]+) set by environment to (\S+)")
_NUMBER = re.compile(r"^\d+$")
_PER_ITERATION = "out-of-place (+ per-iteration)"


class NcclTestsFormatError(ValueError):
    """The text is not nccl-tests output DynamICCL can read; the message says what is missing."""


@dataclass(frozen=True)
class NcclTestsRun:
    program: str
    collective: Collective
    nranks: int
    nnodes: int
    iters: int
    config: NcclConfig
    measurements: tuple[Measurement, ...]
    dropped: int  # halves of rows with #wrong > 0


def _collective(program: str | None, collective: Collective | None) -> tuple[str, Collective]:
    if collective is not None:
        return program or collective.value, collective
    if program is None:
        raise NcclTestsFormatError("no '# Collective test starting: <program>' line: say which collective it is")
    name = program.rsplit("/", 1)[-1]
    if name not in PROGRAMS:
        raise NcclTestsFormatError(f"{name!r} is not a program DynamICCL reads ({', '.join(PROGRAMS)})")
    return name, PROGRAMS[name]


def _forced_config(env: dict[str, str], collective: Collective) -> NcclConfig:
    """The config NCCL's log says the environment forced on `collective` (NCCL's default if none)."""
    try:
        setting = read_env(env).setting()
    except InvalidConfig as error:
        raise NcclTestsFormatError(f"the run's NCCL environment is not one config ({error}): "
                                   "give the config that ran explicitly") from None
    if collective.is_p2p:
        return NcclConfig(nchannels=setting.p2p_nchannels)
    return NcclConfig(algo=setting.algos.get(collective), proto=setting.protos.get(collective),
                      nchannels=setting.nchannels)


def _half(fields: list[str]) -> tuple[float | None, bool]:
    """(time in us, broken?) of one out-of-place or in-place half: time algbw busbw #wrong."""
    try:
        time_us = float(fields[0])
    except ValueError:
        return None, False
    wrong = fields[3]
    return time_us, wrong not in ("0", "N/A")


def parse_nccl_tests(text: str, collective: Collective | None = None, config: NcclConfig | None = None,
                     job_id: str | None = None) -> NcclTestsRun:
    program, iters, env, width = None, 1, {}, 4  # width: columns per half (8 with -I per-iteration timing)
    hosts: dict[int, str] = {}
    rows: list[list[str]] = []
    for line in text.splitlines():
        if found := _ENV.search(line):
            env[found[1]] = found[2]
        stripped = line.strip()
        if _PER_ITERATION in stripped:
            width = 8
        if found := _PROGRAM.match(stripped):
            program = found[1]
        elif found := _ITERS.match(stripped):
            iters = int(found[1])
        elif found := _RANK.match(stripped):
            hosts[int(found[1])] = found[2]
        elif stripped and not stripped.startswith("#"):
            fields = stripped.split()
            if len(fields) >= 5 and _NUMBER.match(fields[0]) and _NUMBER.match(fields[1]):
                rows.append(fields)
    program, collective = _collective(program, collective)
    if not hosts:
        raise NcclTestsFormatError("no '#  Rank N Group G Pid P on HOST device D' lines: ranks and nodes unknown")
    if not rows:
        raise NcclTestsFormatError("no result rows (size count type redop root time algbw busbw #wrong ...)")
    nranks, nnodes = len(hosts), len(set(hosts.values()))
    ran = config if config is not None else _forced_config(env, collective)
    measurements, dropped = [], 0
    for fields in rows:
        context = Context(collective=collective, nbytes=int(fields[0]), nranks=nranks, nnodes=nnodes)
        figures = fields[5:]
        for half in (figures[:width], figures[width:2 * width]):
            if len(half) < 4:
                continue
            time_us, broken = _half(half)
            if time_us is None or time_us <= 0:
                continue
            if broken:
                dropped += 1
                continue
            measurements.append(Measurement(context=context, config=ran, latency_us=time_us, count=iters,
                                            source="bench", job_id=job_id))
    return NcclTestsRun(program, collective, nranks, nnodes, iters, ran, tuple(measurements), dropped)

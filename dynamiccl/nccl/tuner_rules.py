"""Per-size rules in the CSV format of NCCL's example tuner plugin.

One rule a line, the first that matches and that NCCL can run wins, `#` starts a comment:
`collective_type,min_bytes,max_bytes,algorithm,protocol,channels,nNodes,nRanks,numPipeOps,regBuff`
with `-1` meaning "any" (or "NCCL decides" for channels). The last two
columns are optional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.schemas import MAX_CHANNELS, MIN_CHANNELS, Algo, Collective, Context, NcclConfig, Proto

#: Collectives the example tuner plugin knows.
RULE_COLLECTIVES = (
    Collective.broadcast,
    Collective.reduce,
    Collective.allgather,
    Collective.reducescatter,
    Collective.allreduce,
)
HEADER = (
    "# collective_type,min_bytes,max_bytes,algorithm,protocol,channels,"
    "nNodes,nRanks,numPipeOps,regBuff"
)


@dataclass(frozen=True)
class TunerRule:
    collective: Collective
    min_bytes: int
    max_bytes: int
    algo: Algo
    proto: Proto
    nchannels: int | None = None
    nnodes: int | None = None
    nranks: int | None = None
    num_pipe_ops: int | None = None
    reg_buff: int | None = None

    def __post_init__(self) -> None:
        if self.collective not in RULE_COLLECTIVES:
            raise InvalidConfig(f"the tuner plugin has no rules for {self.collective.value}")
        if not 0 <= self.min_bytes <= self.max_bytes:
            raise InvalidConfig(f"byte range {self.min_bytes}..{self.max_bytes} is empty or negative")
        if self.nchannels is not None and not MIN_CHANNELS <= self.nchannels <= MAX_CHANNELS:
            raise InvalidConfig(f"channels must be {MIN_CHANNELS} to {MAX_CHANNELS} or -1")
        for name in ("nnodes", "nranks", "num_pipe_ops"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidConfig(f"{name} must be >= 1 or -1, got {value}")
        if self.reg_buff not in (None, 0, 1):
            raise InvalidConfig(f"regBuff must be 0, 1 or -1, got {self.reg_buff}")

    @property
    def config(self) -> NcclConfig:
        return NcclConfig(algo=self.algo, proto=self.proto, nchannels=self.nchannels)

    def matches(self, context: Context, num_pipe_ops: int = 1, reg_buff: int = 0) -> bool:
        """Whether the rule covers this call, as DynamICCL's plugin and NCCL's example plugin match
        it: collective, inclusive byte range, nodes and ranks of the communicator, and NCCL's
        `numPipeOps` (1 for a call that is not part of an aggregated group) and `regBuff` (0: the
        buffers are not registered; tuner API v3 has no such argument and counts as 0)."""
        return (
            context.collective is self.collective
            and self.min_bytes <= context.nbytes <= self.max_bytes
            and self.nnodes in (None, context.nnodes)
            and self.nranks in (None, context.nranks)
            and self.num_pipe_ops in (None, num_pipe_ops)
            and self.reg_buff in (None, reg_buff)
        )

    def to_csv(self) -> str:
        def opt(value: int | None) -> str:
            return "-1" if value is None else str(value)

        fields = [
            self.collective.value,
            str(self.min_bytes),
            str(self.max_bytes),
            self.algo.value,
            self.proto.value,
            opt(self.nchannels),
            opt(self.nnodes),
            opt(self.nranks),
            opt(self.num_pipe_ops),
            opt(self.reg_buff),
        ]
        return ",".join(fields)


def render_rules(rules: Iterable[TunerRule]) -> str:
    """The rule file, header comment first, one rule a line."""
    return "\n".join([HEADER, *(rule.to_csv() for rule in rules)]) + "\n"


def _parse_optional_int(line_no: int, name: str, text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise InvalidConfig(f"line {line_no}: {name} is not an integer: {text!r}") from None
    return None if value == -1 else value


def _parse_enum(line_no: int, name: str, enum: type, text: str):
    try:
        return enum(text.strip().lower())
    except ValueError:
        raise InvalidConfig(f"line {line_no}: unknown {name} {text.strip()!r}") from None


def parse_rule(line: str, line_no: int = 1) -> TunerRule:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) not in (8, 9, 10):
        raise InvalidConfig(f"line {line_no}: expected 8 to 10 comma-separated fields, got {len(fields)}")
    fields += ["-1"] * (10 - len(fields))
    numbers = {}
    for name, text in zip(("min_bytes", "max_bytes"), fields[1:3]):
        value = _parse_optional_int(line_no, name, text)
        if value is None:
            raise InvalidConfig(f"line {line_no}: {name} must be a byte count, not -1")
        numbers[name] = value
    try:
        return TunerRule(
            collective=_parse_enum(line_no, "collective", Collective, fields[0]),
            algo=_parse_enum(line_no, "algorithm", Algo, fields[3]),
            proto=_parse_enum(line_no, "protocol", Proto, fields[4]),
            nchannels=_parse_optional_int(line_no, "channels", fields[5]),
            nnodes=_parse_optional_int(line_no, "nNodes", fields[6]),
            nranks=_parse_optional_int(line_no, "nRanks", fields[7]),
            num_pipe_ops=_parse_optional_int(line_no, "numPipeOps", fields[8]),
            reg_buff=_parse_optional_int(line_no, "regBuff", fields[9]),
            **numbers,
        )
    except InvalidConfig as error:
        if str(error).startswith("line "):
            raise
        raise InvalidConfig(f"line {line_no}: {error}") from None


def parse_rules(text: str) -> list[TunerRule]:
    """Parse a rule file; blank lines and `#` comments are skipped."""
    rules = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            rules.append(parse_rule(line, line_no))
    return rules


def first_match(
    rules: Iterable[TunerRule], context: Context, num_pipe_ops: int = 1, reg_buff: int = 0
) -> TunerRule | None:
    """The first rule that covers this call, whatever NCCL offers, or None."""
    return next((rule for rule in rules if rule.matches(context, num_pipe_ops, reg_buff)), None)


def applied_rule(
    rules: Iterable[TunerRule],
    context: Context,
    usable: Callable[[Algo, Proto], bool],
    num_pipe_ops: int = 1,
    reg_buff: int = 0,
) -> TunerRule | None:
    """The rule a tuner plugin applies to this call: the first that covers it and whose
    (algorithm, protocol) pair NCCL offers (`usable`); a covering rule whose pair NCCL marks
    unavailable gives way to the next. None means NCCL's own choice for the whole call.

    This is the one Python reference of how DynamICCL's plugin (agent/plugin/
    dynamiccl_tuner.c, tested against it call for call) and NCCL's example plugin pick a rule;
    they differ only in the channels of what no rule sets (NCCL's count, or one channel)."""
    return next(
        (rule for rule in rules if rule.matches(context, num_pipe_ops, reg_buff) and usable(rule.algo, rule.proto)),
        None,
    )

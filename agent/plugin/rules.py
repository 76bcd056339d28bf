"""The rules file DynamICCL's tuner plugin follows, and how the agent changes it inside a job.

The file is NCCL's example-plugin rule CSV (`dynamiccl.nccl.tuner_rules`)
grouped in sections, each opened by a header::

    # dynamiccl: version=3 from_call=48000
    allreduce,0,65535,tree,ll,-1,-1,-1
    ...

Rules before the first header are section version 0 from call 0, so a plain
rule file is a one-section schedule.

Why sections with call indices: every rank of a communicator must run the
same algorithm and protocol for the same call or NCCL hangs, and ranks see a
rewritten file at different moments. The plugin therefore never switches
"when it notices"; each communicator counts its calls (the same sequence on
every rank) and, for call index c, applies the section with the highest
version among those with from_call <= c. That depends only on the file's
content. What the writer must guarantee:

- versions grow and a published section is never edited or removed (a rank
  that skipped a file version, or a communicator created later, whose count
  starts at 0, still sees every switch). `RulesFile` enforces this, and
  replaces the file atomically so no rank reads half of it.
- a new section's from_call lies ahead of every communicator's call count by
  a margin that covers the plugin's reload interval and the time the file
  takes to reach every node: `switch_call` computes it from the plugin's
  reports. A rank that sees a section after its from_call switches at once
  and counts itself `late` in its report: the margin was too small.
- every node of a job writes the same sections (same versions, from_calls
  and rules): they must come from one source, e.g. the server's round.

The plugin's side (parsing, fallbacks, logging) is documented at the top of
`agent/plugin/dynamiccl_tuner.c`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamiccl.agent.plugin.report import PluginReport
from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.nccl.tuner_rules import HEADER as RULES_HEADER
from dynamiccl.nccl.tuner_rules import RULE_COLLECTIVES, TunerRule, first_match, parse_rule, render_rules
from dynamiccl.schemas import Context, Suggestion

HEADER_TAG = "dynamiccl:"
PLUGIN_LIBRARY_PREFIX = "libnccl-tuner-dynamiccl"  # how `dynamiccl plugin build` names the library
SUGGESTION_TAG = "suggestion_id="
_HEADER = re.compile(r"^#\s*dynamiccl:(?P<fields>.*)$")
_SUGGESTION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SUGGESTION_NOTE = re.compile(r"#\s*suggestion_id=(?P<id>[A-Za-z0-9._:-]{1,128})\s*$")


def is_own_plugin(plugin: str | Path) -> bool:
    """Whether a tuner-plugin library is DynamICCL's (as `dynamiccl plugin build` names it)."""
    return Path(plugin).name.startswith(PLUGIN_LIBRARY_PREFIX)


def valid_suggestion_id(sid: str) -> bool:
    """Whether a suggestion id can ride on a rule line as a comment (and be read back)."""
    return _SUGGESTION_ID.fullmatch(sid) is not None


@dataclass(frozen=True)
class Section:
    """Rules in force from call index `from_call` of each communicator, until a newer version's."""

    version: int
    from_call: int
    rules: tuple[TunerRule, ...]
    #: per rule, the server suggestion it carries out (None: none), kept as a `# suggestion_id=` comment
    suggestion_ids: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        if self.version < 0 or self.from_call < 0:
            raise InvalidConfig(f"version and from_call must be >= 0, got {self.version}, {self.from_call}")
        if self.suggestion_ids and len(self.suggestion_ids) != len(self.rules):
            raise InvalidConfig("suggestion_ids must name one id (or None) per rule")
        if any(sid is not None and not valid_suggestion_id(sid) for sid in self.suggestion_ids):
            raise InvalidConfig("a suggestion id must be 1 to 128 of [A-Za-z0-9._:-]")

    def suggestion_id(self, index: int) -> str | None:
        return self.suggestion_ids[index] if self.suggestion_ids else None

    def render(self) -> str:
        header = f"# {HEADER_TAG} version={self.version} from_call={self.from_call}\n"
        if not any(self.suggestion_ids):
            return header + render_rules(self.rules)
        lines = [rule.to_csv() + (f" # {SUGGESTION_TAG}{sid}" if sid else "")
                 for rule, sid in zip(self.rules, self.suggestion_ids)]
        return header + "\n".join([RULES_HEADER, *lines]) + "\n"


def render_schedule(sections: Iterable[Section]) -> str:
    return "".join(section.render() for section in sections)


def _header(line_no: int, text: str) -> tuple[int, int]:
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    try:
        return int(fields["version"]), int(fields["from_call"])
    except (KeyError, ValueError):
        raise InvalidConfig(f"line {line_no}: a section header needs version=V from_call=K") from None


def parse_schedule(text: str) -> list[Section]:
    """The sections of a rules file; raises InvalidConfig where the plugin would fall back."""
    sections: list[Section] = []
    version, from_call, rules, ids = 0, 0, [], []
    opened = False

    def close() -> None:
        sections.append(Section(version, from_call, tuple(rules), tuple(ids) if any(ids) else ()))

    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = _HEADER.match(line)
        if header:
            if opened or rules:
                close()
            version, from_call = _header(line_no, header["fields"])
            if sections and version <= sections[-1].version:
                raise InvalidConfig(f"line {line_no}: version {version} after {sections[-1].version}")
            rules, ids, opened = [], [], True
            continue
        rule_text, _, comment = line.partition("#")
        if rule_text.strip():
            rules.append(parse_rule(rule_text.strip(), line_no))
            note = _SUGGESTION_NOTE.match("#" + comment) if comment else None
            ids.append(note["id"] if note else None)
    if opened or rules:
        close()
    return sections


def in_force(sections: Sequence[Section], call: int) -> Section | None:
    """The section the plugin applies at this call index of a communicator (None: NCCL decides)."""
    eligible = [s for s in sections if s.from_call <= call]
    return max(eligible, key=lambda s: s.version) if eligible else None


def expected_rule(sections: Sequence[Section], call: int, context: Context) -> TunerRule | None:
    """The rule the plugin applies to this call, when NCCL offers its pair (first match wins)."""
    section = in_force(sections, call)
    return first_match(section.rules, context) if section else None


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one step: readers see the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RulesFile:
    """The schedule of one job's rules file: appends sections, never edits them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sections: list[Section] = (
            parse_schedule(path.read_text(encoding="utf-8")) if path.exists() else []
        )

    def publish(self, rules: Sequence[TunerRule], from_call: int, version: int | None = None,
                suggestion_ids: Sequence[str | None] = (), max_bytes: int | None = None) -> Section:
        """Append `rules` as a new version, in force from call `from_call`, and rewrite the file.

        `version` defaults to the next one; writers on several nodes pass it
        explicitly (a function of what they publish) so that their files agree
        even where one of them skipped a version. With `max_bytes`, a file
        that would grow past it is left as it is (InvalidConfig).
        """
        last = self.sections[-1] if self.sections else None
        if last is not None and from_call < last.from_call:
            raise InvalidConfig(f"from_call {from_call} is before version {last.version}'s ({last.from_call})")
        if version is None:
            version = last.version + 1 if last else 0
        elif last is not None and version <= last.version:
            raise InvalidConfig(f"version {version} is not after version {last.version}")
        section = Section(version=version, from_call=from_call, rules=tuple(rules),
                          suggestion_ids=tuple(suggestion_ids))
        text = render_schedule([*self.sections, section])
        if max_bytes is not None and len(text.encode()) > max_bytes:
            raise InvalidConfig(f"{self.path} would grow to {len(text.encode())} bytes, over {max_bytes}")
        write_atomic(self.path, text)
        self.sections.append(section)
        return section


def switch_call(reports: Iterable[PluginReport], margin_calls: int, epoch_calls: int = 1) -> int:
    """A from_call ahead of every communicator the plugin reported, rounded up to `epoch_calls`.

    Communicators count their calls separately, so one index ahead of the
    busiest is ahead of all; a communicator created later starts at 0. The
    margin must cover, in calls of the busiest communicator, the report and
    reload intervals plus the time the file takes to reach every node.
    Rounding to an epoch gives writers on different nodes whose observations
    differ slightly a good chance of the same index; it is no substitute for
    one source of sections per job.
    """
    if margin_calls < 0 or epoch_calls < 1:
        raise ValueError("margin_calls must be >= 0 and epoch_calls >= 1")
    seen = max((comm.calls for report in reports for comm in report.comms), default=0)
    return math.ceil((seen + margin_calls) / epoch_calls) * epoch_calls


def rules_from_suggestions(suggestions: Iterable[Suggestion]) -> list[TunerRule]:
    """Exact-size rules for the server's suggestions that name an algorithm and protocol.

    The NCCL default (and channel-only configs) need no rule: the plugin
    leaves calls no rule matches to NCCL. Put these before the broader
    recommendation rules: first match wins.
    """
    return [rule for rule, _ in suggestion_rules(suggestions)]


def suggestion_rules(suggestions: Iterable[Suggestion]) -> list[tuple[TunerRule, Suggestion]]:
    """`rules_from_suggestions`, each rule with the suggestion it carries out."""
    rules = []
    for suggestion in suggestions:
        context, config = suggestion.context, suggestion.config
        if context.collective not in RULE_COLLECTIVES or config.algo is None or config.proto is None:
            continue
        rule = TunerRule(collective=context.collective, min_bytes=context.nbytes, max_bytes=context.nbytes,
                         algo=config.algo, proto=config.proto, nchannels=config.nchannels,
                         nnodes=context.nnodes, nranks=context.nranks)
        rules.append((rule, suggestion))
    return rules

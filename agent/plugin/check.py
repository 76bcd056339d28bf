"""Read a rules file through the plugin itself, as NCCL would load it, and say how each line was read.

The plugin logs every rule line as it understood it, and every line it refuses
with the reason, when DYNAMICCL_TUNER_LOG_RULES=1 (dynamiccl_tuner.c). This
opens one communicator with that set and collects those lines, so what is
printed is the C parser's reading, not a second parser's guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dynamiccl.agent.plugin.driver import EXPORTED_VERSIONS, TunerLibrary, plugin_environment

WARN = 2
_LINE = re.compile(r" line (\d+) (rule|refused): (.*)$")


@dataclass(frozen=True)
class CheckedLine:
    line_no: int
    accepted: bool
    reading: str  # the rule as the plugin understood it, or why it refused the line


@dataclass(frozen=True)
class Check:
    lines: tuple[CheckedLine, ...]
    warnings: tuple[str, ...]  # about the file as a whole (unreadable, too big, not text)

    @property
    def ok(self) -> bool:
        return not self.warnings and all(line.accepted for line in self.lines)


def check_rules_file(rules_file: Path, library: Path) -> Check:
    """How the plugin at `library` reads `rules_file` (loaded once, as at communicator init)."""
    messages: list[tuple[int, str]] = []
    settings = {"NCCL_TUNER_CONFIG_FILE": str(rules_file), "DYNAMICCL_TUNER_LOG_RULES": "1",
                "DYNAMICCL_TUNER_RELOAD_MS": "-1", "DYNAMICCL_TUNER_REPORT_MS": "-1"}
    with plugin_environment(settings):
        tuner = TunerLibrary(library, version=EXPORTED_VERSIONS[-1])
        with tuner.communicator(1, 1, log=lambda level, _flags, message: messages.append((level, message))):
            pass
    lines, warnings = [], []
    for level, message in messages:
        found = _LINE.search(message)
        if found:
            lines.append(CheckedLine(int(found[1]), found[2] == "rule", found[3]))
        elif level == WARN and " line " not in message:
            warnings.append(message.removeprefix("DynamICCL tuner: "))
    return Check(tuple(lines), tuple(warnings))

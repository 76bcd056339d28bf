"""Building the tuner plugin, `dynamiccl plugin build`, and the agent's side of the rules file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamiccl.agent.plugin import build as build_module
from dynamiccl.agent.plugin import rules as plugin_rules
from dynamiccl.agent.plugin.build import NoCompiler, PluginBuildError, build, cache_dir, find_compiler
from dynamiccl.agent.plugin.report import config_that_ran, read_reports, remove_reports
from dynamiccl.agent.plugin.rules import RulesFile, Section, parse_schedule, rules_from_suggestions, switch_call
from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.nccl.tuner_rules import parse_rules
from dynamiccl.schemas import Algo, Context, NcclConfig, Proto, Suggestion


@pytest.fixture(scope="module")
def compiler() -> list[str]:
    try:
        return find_compiler()
    except NoCompiler as error:
        pytest.skip(f"no C compiler: {error}")


# ---------------------------------------------------------------- build


def test_builds_once_per_source_and_rebuilds_when_it_changes(compiler, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    first = build(out_dir=tmp_path)
    again = build(out_dir=tmp_path)
    assert first.compiled and not again.compiled and again.path == first.path
    assert first.path.name.startswith("libnccl-tuner-dynamiccl-") and first.path.suffix == ".so"
    changed = tmp_path / "changed.c"
    changed.write_text(build_module.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(build_module, "SOURCE", changed)
    rebuilt = build(out_dir=tmp_path)
    assert rebuilt.compiled and rebuilt.path != first.path and rebuilt.path.is_file()
    assert build(out_dir=tmp_path, force=True).compiled
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]  # no temporaries left


def test_the_source_compiles_without_warnings(compiler, tmp_path: Path) -> None:
    built = build(out_dir=tmp_path, extra_flags=("-Werror", "-Wpedantic", "-Wshadow"))
    assert built.compiled and built.path.stat().st_size > 0


def test_the_cache_honours_xdg_cache_home(tmp_path: Path) -> None:
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "dynamiccl" / "plugin"
    assert cache_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/dynamiccl/plugin")


def test_no_compiler_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoCompiler, match="no C compiler found"):
        find_compiler({"PATH": str(tmp_path)})
    with pytest.raises(NoCompiler, match=r"\$CC='/nowhere/cc'"):
        build(environ={"CC": "/nowhere/cc", "PATH": os.environ["PATH"]}, out_dir=tmp_path)


def test_a_failing_compiler_reports_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "badcc"
    fake.write_text("#!/bin/sh\necho 'error: out of ideas' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(PluginBuildError, match="failed \\(3\\):\nerror: out of ideas"):
        build(environ={"CC": str(fake), "PATH": os.environ["PATH"]}, out_dir=tmp_path / "out")


def test_cli_builds_into_the_cache_and_prints_the_path(compiler, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "dynamiccl.cli.main", "plugin", "build"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    path = Path(first.stdout.strip())
    assert path.parent == tmp_path / "dynamiccl" / "plugin" and path.is_file()
    assert second.stdout.strip() == str(path)
    assert "compiled with" in first.stderr and "up to date" in second.stderr
    broken = subprocess.run(command, capture_output=True, text=True, env={**env, "CC": "/nowhere/cc"},
                            timeout=60, check=False)
    assert broken.returncode == 1 and broken.stdout == "" and "$CC='/nowhere/cc'" in broken.stderr


# ---------------------------------------------------------------- the rules file


RULES_A = parse_rules("allreduce,0,65535,tree,ll,-1,-1,-1\nallreduce,65536,1048576,ring,simple,8,-1,-1")
RULES_B = parse_rules("allreduce,0,1048576,ring,ll128,4,1,8")


def test_publish_appends_versions_atomically_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "job.rules"
    rules = RulesFile(path)
    first = rules.publish(RULES_A, from_call=0)
    second = rules.publish(RULES_B, from_call=500)
    assert (first.version, second.version) == (0, 1)
    text = path.read_text()
    assert text.count("# dynamiccl: version=") == 2 and "# dynamiccl: version=1 from_call=500\n" in text
    assert parse_schedule(text) == [first, second] == RulesFile(path).sections
    assert RulesFile(path).publish(RULES_A, from_call=900).version == 2  # continues an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.rules"]  # no temporary left behind
    with pytest.raises(InvalidConfig, match="before version 2"):
        RulesFile(path).publish(RULES_A, from_call=10)


def test_a_plain_rule_file_is_version_0_from_call_0() -> None:
    (section,) = parse_schedule("# comment\nallreduce,0,100,tree,ll,-1,-1,-1\n")
    assert (section.version, section.from_call, len(section.rules)) == (0, 0, 1)


@pytest.mark.parametrize("text, message", [
    ("# dynamiccl: version=1\nallreduce,0,1,tree,ll,-1,-1,-1\n", "needs version=V from_call=K"),
    ("# dynamiccl: version=2 from_call=0\n# dynamiccl: version=2 from_call=5\n", "version 2 after 2"),
    ("allreduce,0,1,warp,ll,-1,-1,-1\n", "unknown algorithm"),
])
def test_parse_schedule_rejects_what_the_plugin_would_not_apply(text: str, message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        parse_schedule(text)


def test_in_force_takes_the_newest_eligible_version() -> None:
    sections = [Section(0, 0, ()), Section(1, 100, ()), Section(2, 50, ())]
    assert [plugin_rules.in_force(sections, c).version for c in (0, 49, 50, 99, 100, 10**9)] == [0, 0, 2, 2, 2, 2]
    assert plugin_rules.in_force([Section(3, 10, ())], 9) is None


def report_json(*calls: int) -> str:
    comms = [{"ctx": i, "comm_id": None, "nranks": 8, "nnodes": 1, "calls": c, "version": 0, "late": 0,
              "finalized": False, "choices": [
                  {"collective": "allreduce", "size_log2": 20, "source": "rule", "algo": "ring",
                   "proto": "simple", "channels": 8, "version": 0, "calls": 3},
                  {"collective": "allreduce", "size_log2": 10, "source": "nccl", "algo": "tree",
                   "proto": "ll", "channels": None, "version": 0, "calls": 1}]}
             for i, c in enumerate(calls)]
    return json.dumps({"pid": 1, "time_unix_ms": 0, "comms": comms})


def test_switch_call_is_ahead_of_every_communicator_reported(tmp_path: Path) -> None:
    rules_file = tmp_path / "job.rules"
    (tmp_path / "job.rules.chosen.11.json").write_text(report_json(1200, 40))
    (tmp_path / "job.rules.chosen.12.json").write_text(report_json(1234))
    (tmp_path / "job.rules.chosen.13.json").write_text("{truncated")  # skipped, never fatal
    reports = read_reports(rules_file)
    assert sorted(r.pid for r in reports) == [1, 1]
    assert switch_call(reports, margin_calls=100) == 1334
    assert switch_call(reports, margin_calls=100, epoch_calls=256) == 1536
    assert switch_call([], margin_calls=0) == 0
    context = Context(collective="allreduce", nbytes=1 << 20, nranks=8, nnodes=1)
    assert config_that_ran(reports, context) == NcclConfig(algo=Algo.ring, proto=Proto.simple, nchannels=8)
    assert config_that_ran(reports, context.model_copy(update={"nbytes": 1500})) == NcclConfig()
    assert config_that_ran(reports, context.model_copy(update={"nranks": 16})) is None
    remove_reports(rules_file)
    assert read_reports(rules_file) == [] and (tmp_path / "job.rules.chosen.13.json").exists() is False


def test_suggestions_become_exact_size_rules_and_the_default_needs_none() -> None:
    def suggestion(nbytes: int, config: NcclConfig, collective: str = "allreduce") -> Suggestion:
        return Suggestion(context=Context(collective=collective, nbytes=nbytes, nranks=16, nnodes=2),
                          config=config, kind="explore", suggestion_id=f"s{nbytes}")

    rules = rules_from_suggestions([
        suggestion(4096, NcclConfig(algo="tree", proto="ll", nchannels=4)),
        suggestion(8192, NcclConfig()),
        suggestion(512, NcclConfig(nchannels=2), collective="alltoall"),
        suggestion(1 << 20, NcclConfig(algo="ring", proto="simple")),
    ])
    assert [(r.min_bytes, r.max_bytes, r.algo, r.proto, r.nchannels, r.nnodes, r.nranks) for r in rules] == [
        (4096, 4096, Algo.tree, Proto.ll, 4, 2, 16), (1 << 20, 1 << 20, Algo.ring, Proto.simple, None, 2, 16)]

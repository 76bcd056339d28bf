"""DynamICCL's tuner plugin, driven through its exported NCCL ABI with fake cost tables."""

from __future__ import annotations

import os
import random
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynamiccl.agent.plugin.check import check_rules_file
from dynamiccl.agent.plugin.driver import (
    ALGOS,
    EXPORTED_VERSIONS,
    PROTOS,
    Communicator,
    Decision,
    TunerLibrary,
    cost_table,
    full_table,
)
from dynamiccl.agent.plugin.report import read_reports
from dynamiccl.agent.plugin.rules import RulesFile, Section, expected_rule, render_schedule
from dynamiccl.cli.plugin import app
from dynamiccl.nccl.tuner_rules import applied_rule, parse_rules
from dynamiccl.schemas import Algo, Collective, Context, Proto

AR, AG = Collective.allreduce, Collective.allgather
WARN, INFO = 2, 3
NCCL_TUNING = 0x40
BASE = (
    "# collective_type,min_bytes,max_bytes,algorithm,protocol,channels,nNodes,nRanks\n"
    "allreduce,0,65535,tree,ll,-1,-1,-1\n"
    "allreduce,65536,1048576,ring,simple,8,-1,-1\n"
    "allgather,0,1048576,ring,ll128,4,2,16\n"
    "allgather,0,1048576,pat,simple,-1,2,2\n"
)


@pytest.fixture(scope="module")
def tuner(library: Path) -> TunerLibrary:
    return TunerLibrary(library, version=5)


@pytest.fixture
def rules_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A rules file NCCL_TUNER_CONFIG_FILE points at; checked at every call, reports at every check."""
    path = tmp_path / "job.rules"
    monkeypatch.setenv("NCCL_TUNER_CONFIG_FILE", str(path))
    monkeypatch.setenv("DYNAMICCL_TUNER_CHECK_CALLS", "1")
    monkeypatch.setenv("DYNAMICCL_TUNER_RELOAD_MS", "0")
    monkeypatch.setenv("DYNAMICCL_TUNER_REPORT_MS", "0")
    return path


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[int, int, str]] = []

    def __call__(self, level: int, flags: int, message: str) -> None:
        self.lines.append((level, flags, message))

    def count(self, text: str, level: int | None = None) -> int:
        return sum(text in m and level in (None, lv) for lv, _, m in self.lines)


@pytest.fixture
def open_comm(tuner: TunerLibrary) -> Iterator[Callable[..., Communicator]]:
    opened: list[Communicator] = []

    def make(nranks: int = 8, nnodes: int = 1, log: Log | None = None, comm_id: int = 7) -> Communicator:
        comm = tuner.communicator(nranks, nnodes, comm_id=comm_id, log=log)
        opened.append(comm)
        return comm

    yield make
    for comm in opened:
        comm.close()


def pair(decision: Decision) -> tuple[Algo | None, Proto | None, int | None]:
    return decision.algo, decision.proto, decision.nchannels


NCCL = (None, None, None)


# ---------------------------------------------------------------- ABI


def test_every_abi_version_is_exported_under_nccls_symbol_names(library: Path) -> None:
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                             check=True).stdout.split()
    exported = {s for s in symbols if s.startswith("ncclTunerPlugin_")}
    assert exported == {f"ncclTunerPlugin_v{v}" for v in EXPORTED_VERSIONS} and EXPORTED_VERSIONS == (3, 4, 5, 6, 7)
    # nothing else leaks: only the tables NCCL looks for are exported
    assert not [s for s in symbols if s in ("collinfo", "start", "merge_file", "advance")]
    for version in (6, 7):
        table = TunerLibrary(library, version=version)
        assert table.name == "DynamICCL" and not table.api.getChunkSize  # optional, NULL: NCCL's chunk size


@pytest.mark.parametrize("version", EXPORTED_VERSIONS)
def test_each_abi_version_applies_the_rules(library: Path, rules_path: Path, version: int) -> None:
    rules_path.write_text(BASE)
    with TunerLibrary(library, version=version).communicator(8, 1) as comm:
        assert pair(comm.choose(AR, 1024)) == (Algo.tree, Proto.ll, None)
        assert pair(comm.choose(AR, 1 << 20)) == (Algo.ring, Proto.simple, 8)
        assert pair(comm.choose(AR, (1 << 20) + 1)) == NCCL


# ---------------------------------------------------------------- selection


def test_rules_select_by_size_with_inclusive_bounds(rules_path: Path, open_comm) -> None:
    rules_path.write_text(BASE)
    comm = open_comm()
    decisions = {n: pair(comm.choose(AR, n)) for n in (0, 65535, 65536, 1 << 20, (1 << 20) + 1)}
    assert decisions == {
        0: (Algo.tree, Proto.ll, None), 65535: (Algo.tree, Proto.ll, None),
        65536: (Algo.ring, Proto.simple, 8), 1 << 20: (Algo.ring, Proto.simple, 8), (1 << 20) + 1: NCCL,
    }
    picked = comm.choose(AR, 100)
    assert picked.table[ALGOS.index(Algo.tree) * 3 + PROTOS.index(Proto.ll)] == 0.0
    assert sorted(picked.table)[1:] == sorted(full_table())[1:]  # only the chosen cell changed


def test_rules_select_by_topology(rules_path: Path, open_comm) -> None:
    rules_path.write_text(BASE)
    two_nodes_16, two_nodes_2, one_node = open_comm(16, 2), open_comm(2, 2), open_comm(8, 1)
    assert pair(two_nodes_16.choose(AG, 4096)) == (Algo.ring, Proto.ll128, 4)
    assert pair(two_nodes_2.choose(AG, 4096)) == (Algo.pat, Proto.simple, None)
    assert pair(one_node.choose(AG, 4096)) == NCCL  # no rule for 8 ranks on 1 node
    assert pair(two_nodes_16.choose(AR, 4096)) == (Algo.tree, Proto.ll, None)  # -1: any topology


def test_first_match_wins_and_pipe_ops_and_reg_buff_filter(rules_path: Path, open_comm) -> None:
    rules_path.write_text(
        "allreduce,0,1000,ring,ll,2,-1,-1,4,-1\n"  # only aggregated groups of 4
        "allreduce,0,1000,ring,ll128,-1,-1,-1,-1,1\n"  # only registered buffers
        "allreduce,0,1000,tree,simple,-1,-1,-1\n"
        "allreduce,0,1000,ring,simple,-1,-1,-1\n"  # shadowed
    )
    comm = open_comm()
    assert pair(comm.choose(AR, 10, pipe_ops=4)) == (Algo.ring, Proto.ll, 2)
    assert pair(comm.choose(AR, 10, reg_buff=1)) == (Algo.ring, Proto.ll128, None)
    assert pair(comm.choose(AR, 10)) == (Algo.tree, Proto.simple, None)


def test_reg_buff_zero_means_unregistered_buffers_only(rules_path: Path, open_comm) -> None:
    """regBuff 0 is a valid value in NVIDIA's format ("not registered"), not a malformed line."""
    rules_path.write_text("allreduce,0,1000,ring,simple,-1,-1,-1,-1,0\n")
    comm = open_comm()
    assert pair(comm.choose(AR, 10, reg_buff=0)) == (Algo.ring, Proto.simple, None)
    assert pair(comm.choose(AR, 10, reg_buff=1)) == NCCL


# ---------------------------------------------------------------- fallbacks


def test_missing_file_means_nccls_choice_logged_once(tmp_path: Path, rules_path: Path, open_comm) -> None:
    log = Log()
    comm = open_comm(log=log)
    assert all(pair(comm.choose(AR, n)) == NCCL for n in (1, 1 << 20, 1 << 30))
    assert log.count("cannot read", WARN) == 1 and log.count("NCCL decides") >= 1
    assert all(flags == NCCL_TUNING for _, flags, _ in log.lines)


def test_no_rules_file_configured(monkeypatch: pytest.MonkeyPatch, open_comm) -> None:
    monkeypatch.delenv("NCCL_TUNER_CONFIG_FILE", raising=False)
    log = Log()
    comm = open_comm(log=log)
    assert pair(comm.choose(AR, 1024)) == NCCL and log.count("NCCL_TUNER_CONFIG_FILE is not set") == 1


def test_a_malformed_line_makes_its_section_defer_to_nccl(rules_path: Path, open_comm) -> None:
    rules_path.write_text(
        BASE
        + "# dynamiccl: version=1 from_call=2\n"
        + "allreduce,0,65535,ring,ll,-1,-1,-1\n"
        + "allreduce,lots,65535,ring,ll,-1,-1,-1\n"
        + "# dynamiccl: version=2 from_call=4\n"
        + "allreduce,0,65535,ring,simple,-1,-1,-1\n"
    )
    log = Log()
    comm = open_comm(log=log)
    seen = [pair(comm.choose(AR, 1024)) for _ in range(5)]
    assert seen == [(Algo.tree, Proto.ll, None)] * 2 + [NCCL] * 2 + [(Algo.ring, Proto.simple, None)]
    assert log.count("line 8 is not a rule", WARN) == 1


@pytest.mark.parametrize("bad", [
    "allreduce,0,100,ring,ll,-1,-1\n",  # 7 fields
    "allreduce,0,100,ring,ll,-1,-1,-1,-1,-1,-1\n",  # 11 fields
    "allreduce,100,0,ring,ll,-1,-1,-1\n",  # empty range
    "allreduce,0,100,ring,ll,0,-1,-1\n",  # 0 channels
    "allreduce,0,100,ring,ll,-1,-1,-1,-1,2\n",  # regBuff 2
    "allreduce,,100,ring,ll,-1,-1,-1\n",  # empty field
    "allreduce,-5,100,ring,ll,-1,-1,-1\n",  # negative size
    "allreduce,0,99999999999999999999,ring,ll,-1,-1,-1\n",  # over 64 bits
    "allreduce,0,1e6,ring,ll,-1,-1,-1\n",  # not an integer
])
def test_malformed_lines_are_rejected(rules_path: Path, open_comm, bad: str) -> None:
    rules_path.write_text("allreduce,0,100,tree,ll,-1,-1,-1\n" + bad)
    log = Log()
    assert pair(open_comm(log=log).choose(AR, 50)) == NCCL
    assert log.count("is not a rule", WARN) == 1


def test_a_bad_header_skips_only_its_section(rules_path: Path, open_comm) -> None:
    rules_path.write_text(
        "# dynamiccl: version=1 from_call=0\nallreduce,0,100,tree,ll,-1,-1,-1\n"
        "# dynamiccl: version=two from_call=1\nallreduce,0,100,ring,ll,-1,-1,-1\n"
        "# dynamiccl: version=3 from_call=2\nallreduce,0,100,ring,simple,-1,-1,-1\n"
    )
    log = Log()
    comm = open_comm(log=log)
    assert [pair(comm.choose(AR, 50))[:2] for _ in range(3)] == [(Algo.tree, Proto.ll)] * 2 + [(Algo.ring, Proto.simple)]
    assert log.count("section skipped", WARN) == 1


def test_binary_or_huge_files_are_ignored(rules_path: Path, open_comm) -> None:
    rules_path.write_bytes(b"allreduce,0,100,tree,ll,-1,-1,-1\n\0\xff")
    log = Log()
    assert pair(open_comm(log=log).choose(AR, 50)) == NCCL and log.count("not a text file") == 1
    rules_path.write_bytes(b"#" * (4 << 20) + b"\nallreduce,0,100,tree,ll,-1,-1,-1\n")
    log = Log()
    assert pair(open_comm(log=log).choose(AR, 50)) == NCCL and log.count("is over") == 1


def test_a_line_naming_something_unknown_never_applies(rules_path: Path, open_comm) -> None:
    rules_path.write_text(
        "allreduce,0,100,warp_drive,ll,-1,-1,-1\n"  # unknown algorithm: the next matching rule applies
        "allreduce,0,200,ring,ll,-1,-1,-1\n"
        "allreduce,201,300,ring,quantum,-1,-1,-1\n"
        "alltoeveryone,0,1000,ring,ll,-1,-1,-1\n"  # unknown collective: the line matches nothing
        "allgather,0,1000,ring,simple,-1,-1,-1\n"
    )
    log = Log()
    comm = open_comm(log=log)
    ring_ll = (Algo.ring, Proto.ll, None)
    assert [pair(comm.choose(AR, n)) for n in (50, 150, 250)] == [ring_ll, ring_ll, NCCL]
    assert pair(comm.choose(AG, 50)) == (Algo.ring, Proto.simple, None)
    for _ in range(10):
        comm.choose(AR, 50)
    assert log.count("unknown algorithm", INFO) == 1  # once per communicator


def test_a_pair_nccl_marks_unavailable_gives_way_to_the_next_matching_rule(rules_path: Path, open_comm) -> None:
    rules_path.write_text("allreduce,0,1000,nvls,simple,16,-1,-1\nallreduce,0,500,ring,ll,4,-1,-1\n")
    log = Log()
    comm = open_comm(log=log)
    table = cost_table({(Algo.ring, Proto.ll): 5.0, (Algo.tree, Proto.ll): 3.0})  # nvls: IGNORE
    for _ in range(3):
        assert pair(comm.choose(AR, 100, table=table)) == (Algo.ring, Proto.ll, 4)
        decision = comm.choose(AR, 800, table=table)  # no other rule: NCCL decides
        assert pair(decision) == NCCL and list(decision.table) == table
    assert log.count("not available to NCCL", INFO) == 1
    available = cost_table({(Algo.nvls, Proto.simple): 9.0, (Algo.ring, Proto.ll): 5.0})
    assert pair(comm.choose(AR, 100, table=available)) == (Algo.nvls, Proto.simple, 16)


def test_no_logger_is_tolerated(rules_path: Path, open_comm) -> None:
    rules_path.write_text("allreduce,0,100,warp,ll,-1,-1,-1\nallreduce,0,oops\n")
    comm = open_comm(log=None)
    assert pair(comm.choose(AR, 50, table=cost_table())) == NCCL
    rules_path.unlink()
    assert pair(open_comm(log=None).choose(AR, 50)) == NCCL


def test_other_call_types_are_left_alone(rules_path: Path, tuner: TunerLibrary, open_comm) -> None:
    rules_path.write_text(BASE)
    comm = open_comm()
    cells = comm._cells
    cells[:] = full_table()
    channels = comm._channels
    for func in (5, 6, 8, 11, -1):  # send/recv, alltoall, allgatherv, garbage
        assert tuner.api.getCollInfo(comm._handle, func, 1024, 1, comm._table_ptr, 7, 3, 0, channels) == 0
    assert list(cells) == full_table() and channels.value == 0


# ---------------------------------------------------------------- reload and the agreed switch point


def test_reload_applies_a_new_section_exactly_at_its_call_index(rules_path: Path, open_comm) -> None:
    rules = RulesFile(rules_path)
    rules.publish(parse_rules("allreduce,0,1000,tree,ll,-1,-1,-1"), from_call=0)
    comm = open_comm()
    seen = [pair(comm.choose(AR, 100))[:2] for _ in range(3)]
    rules.publish(parse_rules("allreduce,0,1000,ring,simple,-1,-1,-1"), from_call=6)
    seen += [pair(comm.choose(AR, 100))[:2] for _ in range(5)]
    assert seen == [(Algo.tree, Proto.ll)] * 6 + [(Algo.ring, Proto.simple)] * 2


def test_reload_waits_for_the_interval(rules_path: Path, monkeypatch: pytest.MonkeyPatch, open_comm) -> None:
    monkeypatch.setenv("DYNAMICCL_TUNER_RELOAD_MS", "-1")  # read once at init
    rules = RulesFile(rules_path)
    rules.publish(parse_rules("allreduce,0,1000,tree,ll,-1,-1,-1"), from_call=0)
    comm = open_comm()
    rules.publish(parse_rules("allreduce,0,1000,ring,simple,-1,-1,-1"), from_call=1)
    assert {pair(comm.choose(AR, 100))[:2] for _ in range(20)} == {(Algo.tree, Proto.ll)}


def test_a_deleted_or_broken_file_changes_nothing_in_force(rules_path: Path, open_comm) -> None:
    rules = RulesFile(rules_path)
    rules.publish(parse_rules("allreduce,0,1000,tree,ll,-1,-1,-1"), from_call=0)
    comm = open_comm()
    assert pair(comm.choose(AR, 100))[:2] == (Algo.tree, Proto.ll)
    rules_path.unlink()
    assert pair(comm.choose(AR, 100))[:2] == (Algo.tree, Proto.ll)
    rules_path.write_text("# dynamiccl: version=1 from_call=x\nallreduce,0,1000,ring,ll,-1,-1,-1\n")
    assert [pair(comm.choose(AR, 100))[:2] for _ in range(3)] == [(Algo.tree, Proto.ll)] * 3


def run_ranks(ranks: list[Communicator], calls: list[tuple[Collective, int]], lag: list[int],
              events: dict[int, Callable[[], None]]) -> list[list[tuple]]:
    """Each rank runs the same calls; rank r trails the leader by lag[r] calls; `events[k]`
    runs when the leader is about to make call k (a writer updating the file)."""
    seen: list[list[tuple]] = [[] for _ in ranks]
    for step in range(len(calls) + max(lag)):
        if step in events:
            events[step]()
        for r, comm in enumerate(ranks):
            index = step - lag[r]
            if 0 <= index < len(calls):
                seen[r].append(pair(comm.choose(*calls[index])))
    return seen


def test_ranks_reading_at_different_times_agree_on_every_call(
        rules_path: Path, monkeypatch: pytest.MonkeyPatch, tuner: TunerLibrary) -> None:
    rules = RulesFile(rules_path)
    rules.publish(parse_rules(BASE), from_call=0)
    ranks = []
    for check_calls in (1, 3, 7, 16):  # each rank notices a new file at a different call
        monkeypatch.setenv("DYNAMICCL_TUNER_CHECK_CALLS", str(check_calls))
        ranks.append(tuner.communicator(8, 1))
    sizes = [100, 70_000, 4096, 1 << 20, 60_000]
    calls = [(AR, sizes[i % len(sizes)]) for i in range(240)]
    lag = [0, 5, 11, 2]  # ranks run ahead of each other, as CPU threads of a job do
    versions = [
        "allreduce,0,1048576,ring,ll128,4,-1,-1",
        "allreduce,0,65535,ring,simple,2,-1,-1\nallreduce,65536,1048576,tree,simple,-1,-1,-1",
        "allreduce,0,4096,nvls,simple,-1,-1,-1\nallreduce,4097,1048576,ring,ll,8,-1,-1",
        "allreduce,0,1048576,tree,ll128,-1,-1,-1",
    ]
    margin = max(lag) + 16 + 1  # the slowest check interval plus how far ranks drift apart
    # The writer sees the leader's call count (its report) and announces far enough ahead.
    events = {at: (lambda at=at, text=text: rules.publish(parse_rules(text), from_call=at + margin))
              for at, text in zip((30, 45, 120, 190), versions)}
    seen = run_ranks(ranks, calls, lag, events)
    try:
        assert seen[1] == seen[0] and seen[2] == seen[0] and seen[3] == seen[0]
        expected = []
        for index, (collective, nbytes) in enumerate(calls):
            rule = expected_rule(rules.sections, index, Context(collective=collective, nbytes=nbytes, nranks=8, nnodes=1))
            expected.append(NCCL if rule is None else (rule.algo, rule.proto, rule.nchannels))
        assert seen[0] == expected
        assert len({version for version in (s.version for s in rules.sections)}) == 5
        assert len(set(seen[0])) >= 6  # the switches really changed the choices
        reports = read_reports(rules_path)
        comms = [c for report in reports for c in report.comms if not c.finalized]
        assert len(comms) == 4 and {c.late for c in comms} == {0} and {c.version for c in comms} == {4}
    finally:
        for comm in ranks:
            comm.close()


def test_keeping_old_sections_is_what_lets_a_rank_that_missed_a_file_agree(
        rules_path: Path, monkeypatch: pytest.MonkeyPatch, tuner: TunerLibrary) -> None:
    """Rank A sees every file version, rank B only the last one. Kept sections: they agree.
    A writer that replaced the file with only its newest section would make them disagree."""
    v0 = Section(0, 0, tuple(parse_rules("allreduce,0,1000,tree,ll,-1,-1,-1")))
    v1 = Section(1, 20, tuple(parse_rules("allreduce,0,1000,ring,ll,-1,-1,-1")))
    v2 = Section(2, 30, tuple(parse_rules("allreduce,0,1000,ring,simple,-1,-1,-1")))
    for keep_old, agree in ((True, True), (False, False)):
        rules_path.write_text(render_schedule([v0]))
        monkeypatch.setenv("DYNAMICCL_TUNER_CHECK_CALLS", "1")
        a = tuner.communicator(8, 1)
        monkeypatch.setenv("DYNAMICCL_TUNER_CHECK_CALLS", "15")  # checks at calls 14, 29, ...
        b = tuner.communicator(8, 1)
        seen_a, seen_b = [], []
        for call in range(40):
            if call == 10:
                rules_path.write_text(render_schedule([v0, v1]))
            if call == 12:
                rules_path.write_text(render_schedule([v0, v1, v2] if keep_old else [v2]))
            seen_a.append(pair(a.choose(AR, 100)))
            seen_b.append(pair(b.choose(AR, 100)))
        a.close()
        b.close()
        assert (seen_a == seen_b) is agree
        assert seen_a[20:30] == [(Algo.ring, Proto.ll, None)] * 10


def test_a_late_rank_switches_at_once_warns_and_reports_it(rules_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           open_comm) -> None:
    monkeypatch.setenv("DYNAMICCL_TUNER_CHECK_CALLS", "10")  # checks at calls 9, 19, ...
    rules = RulesFile(rules_path)
    rules.publish(parse_rules("allreduce,0,1000,tree,ll,-1,-1,-1"), from_call=0)
    log = Log()
    comm = open_comm(log=log)
    seen = [pair(comm.choose(AR, 100))[:2] for _ in range(12)]
    rules.publish(parse_rules("allreduce,0,1000,ring,ll,-1,-1,-1"), from_call=14)  # seen only at call 19
    seen += [pair(comm.choose(AR, 100))[:2] for _ in range(10)]
    assert seen == [(Algo.tree, Proto.ll)] * 19 + [(Algo.ring, Proto.ll)] * 3
    assert log.count("seen only at call 19", WARN) == 1
    (comm_report,) = [c for r in read_reports(rules_path) for c in r.comms if not c.finalized]
    assert comm_report.late == 1 and comm_report.version == 1


def test_a_new_communicator_replays_the_schedule_from_its_own_call_zero(rules_path: Path, open_comm) -> None:
    rules = RulesFile(rules_path)
    rules.publish(parse_rules("allreduce,0,1000,tree,ll,-1,-1,-1"), from_call=0)
    rules.publish(parse_rules("allreduce,0,1000,ring,ll,-1,-1,-1"), from_call=3)
    old = open_comm()
    for _ in range(10):
        old.choose(AR, 100)
    new = open_comm()
    assert [pair(new.choose(AR, 100))[:2] for _ in range(4)] == [(Algo.tree, Proto.ll)] * 3 + [(Algo.ring, Proto.ll)]


# ---------------------------------------------------------------- the report


def test_the_report_says_what_ran_per_size_class(rules_path: Path, open_comm) -> None:
    rules = RulesFile(rules_path)
    rules.publish(parse_rules(BASE), from_call=0)
    comm = open_comm(comm_id=0xfeed)
    for _ in range(3):
        comm.choose(AR, 1000)
    comm.choose(AR, 100_000)
    comm.choose(AR, 1 << 21, table=cost_table({(Algo.ring, Proto.ll): 7.0, (Algo.tree, Proto.simple): 4.0}))
    (report,) = read_reports(rules_path)
    (mine,) = [c for c in report.comms if c.comm_id == "0x000000000000feed"]
    assert (mine.nranks, mine.nnodes, mine.calls, mine.version, mine.late) == (8, 1, 5, 0, 0)
    small = mine.choice_for(AR, 1000)
    assert (small.source, small.algo, small.proto, small.nchannels, small.calls, small.size_log2) == (
        "rule", Algo.tree, Proto.ll, None, 3, 9)
    mid = mine.choice_for(AR, 100_000)
    assert (mid.algo, mid.proto, mid.nchannels, mid.calls) == (Algo.ring, Proto.simple, 8, 1)
    big = mine.choice_for(AR, 1 << 21)  # no rule: NCCL's cheapest pair is recorded, config is the default
    assert (big.source, big.algo, big.proto, big.config.is_default) == ("nccl", Algo.tree, Proto.simple, True)
    comm.close()
    (final,) = [c for r in read_reports(rules_path) for c in r.comms if c.comm_id == "0x000000000000feed"]
    assert final.finalized and final.calls == 5


def test_the_report_is_never_written_through_a_planted_file_or_link(rules_path: Path, open_comm) -> None:
    rules_path.write_text(BASE)
    victim = rules_path.with_name("victim")
    victim.write_text("precious\n")
    report = rules_path.with_name(f"{rules_path.name}.chosen.{os.getpid()}.json")
    report.with_name(report.name + ".tmp").symlink_to(victim)  # where the plugin writes first
    report.symlink_to(victim)  # and what it renames onto
    comm = open_comm()
    comm.choose(AR, 1000)
    assert victim.read_text() == "precious\n"
    assert not report.is_symlink() and read_reports(rules_path)[0].comms[0].calls == 1


def test_communicators_on_several_threads_while_reports_are_written(rules_path: Path, tuner: TunerLibrary) -> None:
    """NCCL plans each communicator on its own thread; reports read every live one."""
    rules_path.write_text(BASE)
    comms = [tuner.communicator(8, 1, comm_id=i + 1) for i in range(4)]
    wrong: list[object] = []

    def run(comm: Communicator) -> None:
        try:
            for i in range(1500):
                odd = i % 2
                got = pair(comm.choose(AR, 1000 if odd else 100_000))
                if got != ((Algo.tree, Proto.ll, None) if odd else (Algo.ring, Proto.simple, 8)):
                    wrong.append(got)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            wrong.append(error)

    def churn() -> None:  # communicators come and go while the others report
        for _ in range(150):
            with tuner.communicator(2, 2) as comm:
                comm.choose(AG, 10)

    threads = [threading.Thread(target=run, args=(c,)) for c in comms] + [threading.Thread(target=churn)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and wrong == []
    (report,) = read_reports(rules_path)
    live = {c.comm_id: c.calls for c in report.comms if c.nranks == 8}
    assert sorted(live) == [f"0x{i:016x}" for i in range(1, 5)] and all(0 < n <= 1500 for n in live.values())
    for comm in comms:
        comm.close()  # each finalize reports the communicators still live, itself marked finalized
    (report,) = read_reports(rules_path)
    assert [(c.comm_id, c.calls, c.finalized) for c in report.comms] == [("0x0000000000000004", 1500, True)]


def test_plugin_show_prints_what_ran(rules_path: Path, open_comm) -> None:
    rules_path.write_text(BASE)
    comm = open_comm(16, 2, comm_id=0xbeef)
    comm.choose(AG, 4096)
    comm.choose(AG, 5000)
    comm.choose(AR, 1 << 30)
    result = CliRunner().invoke(app, ["show", str(rules_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("communicator 0x000000000000beef (16 ranks, 2 nodes): 3 calls, rules version 0" in l for l in lines)
    row = next(l for l in lines if "allgather" in l).split("│")
    assert [c.strip() for c in row[1:-1]] == ["allgather", "4 KiB to <8 KiB", "rule", "ring", "ll128", "4", "0", "2"]
    row = next(l for l in lines if "allreduce" in l).split("│")
    assert [c.strip() for c in row[1:-1]] == [
        "allreduce", "1 GiB to <2 GiB", "NCCL (its cost model's pick)", "tree", "ll", "NCCL's", "0", "1"]
    missing = CliRunner().invoke(app, ["show", str(rules_path.with_name("other.rules"))])
    assert missing.exit_code == 1


# ---------------------------------------------------------------- reading others' files

NVIDIA_EXAMPLE = Path(__file__).parent / "data" / "nvidia_example_nccl_tuner.conf"  # plugins/tuner/example, as shipped


def test_plugin_check_reads_nvidias_example_file_rule_for_rule(library: Path, tmp_path: Path) -> None:
    result = check_rules_file(NVIDIA_EXAMPLE, library)
    assert result.ok and [line.line_no for line in result.lines] == [19, 23, 26, 30, 33, 36, 40, 42, 45]
    assert result.lines[1].reading == ("allreduce bytes 65537..1048576 ring/simple channels=4 nNodes=4 nRanks=32 "
                                       "numPipeOps=1 regBuff=0")
    cli = CliRunner().invoke(app, ["check", str(NVIDIA_EXAMPLE)], env={"XDG_CACHE_HOME": str(tmp_path)})
    assert cli.exit_code == 0 and "9 rules read, 0 lines refused" in cli.output


def test_nvidias_example_file_applies_as_nvidias_plugin_applies_it(rules_path: Path, open_comm) -> None:
    rules_path.write_text(NVIDIA_EXAMPLE.read_text())  # a copy: the plugin's reports land beside it
    four_nodes, one_node = open_comm(32, 4), open_comm(8, 1)
    assert pair(four_nodes.choose(AR, 100_000, pipe_ops=1, reg_buff=0)) == (Algo.ring, Proto.simple, 4)
    assert pair(four_nodes.choose(AR, 100_000, pipe_ops=1, reg_buff=1)) == NCCL  # that rule is for regBuff 0
    assert pair(one_node.choose(AR, 1024, reg_buff=1)) == (Algo.tree, Proto.simple, 2)
    # NCCL offers no tree for reducescatter: the rule gives way, and no other matches
    no_tree = cost_table({(Algo.ring, Proto.simple): 5.0, (Algo.ring, Proto.ll): 3.0})
    assert pair(one_node.choose(Collective.reducescatter, 1024, no_tree, pipe_ops=1, reg_buff=1)) == NCCL


def test_plugin_check_names_every_refused_line_and_fails(rules_path: Path, library: Path) -> None:
    rules_path.write_text(
        "allreduce,0,10,ring,ll,0,-1,-1\n"
        "allreduce,0,oops,ring\n"
        "allreduce,0,10,warp,ll,-1,-1,-1\n"
        "allreduce,0,10,ring,ll,-1,-1,-1,1,2\n"
        "# dynamiccl: version=x\n"
        "allgather,0,10,ring,ll,-1,-1,-1\n"
    )
    result = check_rules_file(rules_path, library)
    assert not result.ok and [(line.line_no, line.accepted) for line in result.lines] == [
        (1, False), (2, False), (3, False), (4, False), (5, False)]
    assert [line.reading.split(" (")[0] for line in result.lines] == [
        "channels must be -1", "fewer than 8 fields", "unknown algorithm 'warp'",
        "regBuff must be -1", "a section header needs version=V from_call=K with versions increasing"]
    cli = CliRunner().invoke(app, ["check", str(rules_path)], env={"XDG_CACHE_HOME": str(rules_path.parent)})
    assert cli.exit_code == 1 and "5 lines refused" in cli.output
    missing = check_rules_file(rules_path.with_name("absent.rules"), library)
    assert not missing.ok and "cannot read" in missing.warnings[0]


# ---------------------------------------------------------------- one reference


def test_the_plugin_applies_rules_exactly_as_the_python_reference_does(rules_path: Path, open_comm) -> None:
    """`dynamiccl.nccl.tuner_rules.applied_rule` is what the server's rules, the simulator and the
    hook assume the plugin does: the same calls through both, random rules, tables and arguments."""
    rng = random.Random(0)
    collectives = [AR, AG, Collective.reducescatter, Collective.broadcast, Collective.reduce]
    pairs = [(a, p) for a in (Algo.ring, Algo.tree, Algo.nvls, Algo.pat) for p in PROTOS]
    for trial in range(20):
        lines = []
        for _ in range(12):
            low = rng.choice([0, 1 << 10, 1 << 16, 1 << 20])
            algo, proto = rng.choice(pairs)
            lines.append(",".join(map(str, [
                rng.choice(collectives).value, low, low + rng.choice([0, 1 << 12, 1 << 20, 1 << 30]),
                algo.value, proto.value, rng.choice([-1, 1, 8, 32]), rng.choice([-1, 1, 2]),
                rng.choice([-1, 8, 16]), rng.choice([-1, 1, 2]), rng.choice([-1, 0, 1])])))
        text = "\n".join(lines) + "\n"
        rules_path.write_text(text)
        rules = parse_rules(text)
        for nranks, nnodes in ((8, 1), (16, 2)):
            comm = open_comm(nranks, nnodes, comm_id=trial * 10 + nnodes)
            for _ in range(40):
                collective = rng.choice(collectives)
                nbytes = rng.choice([0, 1 << 10, (1 << 16) + 1, 1 << 20, 5 << 20, 1 << 31])
                pipe_ops, reg_buff = rng.choice([1, 2]), rng.choice([0, 1])
                offered = {pair: 10.0 + i for i, pair in enumerate(pairs) if rng.random() < 0.7}
                decision = comm.choose(collective, nbytes, cost_table(offered), pipe_ops=pipe_ops, reg_buff=reg_buff)
                context = Context(collective=collective, nbytes=nbytes, nranks=nranks, nnodes=nnodes)
                rule = applied_rule(rules, context, lambda a, p: (a, p) in offered, pipe_ops, reg_buff)
                expected = NCCL if rule is None else (rule.algo, rule.proto, rule.nchannels)
                assert pair(decision) == expected, (text, context, pipe_ops, reg_buff, sorted(offered))

"""nccl-tests output, as its programs print it (src/util.cu), read as measurements."""

from pathlib import Path

import pytest

from dynamiccl.nccl.nccl_tests import NcclTestsFormatError, parse_nccl_tests
from dynamiccl.schemas import Collective, NcclConfig

DATA = Path(__file__).parent / "data"


def header(program: str, ranks: list[str]) -> str:
    lines = [f"# Collective test starting: {program}",
             "# nThread 1 nGpus 1 minBytes 1024 maxBytes 2048 step: 2(factor) warmup iters: 5 iters: 50 agg iters: 1 "
             "validation: 1 graph: 0 unalign: 0", "#", "# Using devices"]
    lines += [f"#  Rank {r:2d} Group  0 Pid {1000 + r:6d} on {host:>10s} device {r % 8:2d} [0000:18:00] NVIDIA H100"
              for r, host in enumerate(ranks)]
    lines += ["#", "#                                                              out-of-place                       "
              "in-place          ",
              "#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   "
              "busbw #wrong",
              "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  "
              "(GB/s)       "]
    return "\n".join(lines) + "\n"


def test_all_reduce_on_two_nodes_with_the_forced_env_from_ncclss_log():
    run = parse_nccl_tests((DATA / "all_reduce_perf_2x8.txt").read_text(), job_id="sweep")
    assert (run.collective, run.nranks, run.nnodes, run.iters) == (Collective.allreduce, 16, 2, 20)
    assert run.config == NcclConfig(algo="ring", proto="simple")  # NCCL_ALGO / NCCL_PROTO set by environment
    by_size = {}
    for m in run.measurements:
        by_size.setdefault(m.context.nbytes, []).append(m.latency_us)
        assert m.source == "bench" and m.count == 20 and m.job_id == "sweep" and m.config == run.config
    assert by_size == {1 << 20: [61.52, 60.87], 4 << 20: [103.9, 102.8], 16 << 20: [249.9], 64 << 20: [704.3, 701.2]}
    assert run.dropped == 1  # the out-of-place half with 3 wrong elements


@pytest.mark.parametrize("program, collective", [("all_gather_perf", Collective.allgather),
                                                 ("reduce_scatter_perf", Collective.reducescatter)])
def test_all_gather_and_reduce_scatter_sizes_are_the_totals_nccl_counts(program, collective):
    text = header(program, ["node-a"] * 8) + (
        "        1024            32     float    none      -1    12.10    0.08    0.07      0    11.90    0.09    0.08    N/A\n"
        "        2048            64     float    none      -1    12.50    0.16    0.14      0    12.40    0.17    0.14      0\n"
        "        2048            64     float    none      -1    12.60    0.16    0.14      0    12.30    0.17    0.14      0\n")
    run = parse_nccl_tests(text, config=NcclConfig(algo="ring", proto="ll"))
    assert run.collective is collective and (run.nranks, run.nnodes) == (8, 1)
    assert [m.context.nbytes for m in run.measurements] == [1024, 1024, 2048, 2048, 2048, 2048]  # rows repeated: kept
    assert run.config == NcclConfig(algo="ring", proto="ll") and run.measurements[0].count == 50


def test_per_iteration_timing_columns():
    text = header("all_reduce_perf", ["n"] * 2).replace("out-of-place  ", "out-of-place (+ per-iteration)  ", 1) + (
        "        1024           256     float     sum      -1    10.0   0.10   0.10      0    9.0   11.0   10.9  "
        "3.1    10.5   0.10   0.10      0    9.5   11.5   11.2   2.0\n")
    assert [m.latency_us for m in parse_nccl_tests(text).measurements] == [10.0, 10.5]


@pytest.mark.parametrize("text, message", [
    ("# nothing here\n", "Collective test starting"),
    (header("hypercube_perf", ["a"]), "not a program"),
    (header("all_reduce_perf", ["a"]), "no result rows"),
    ("# Collective test starting: all_reduce_perf\n      1024  256 float sum -1 10.0 0.1 0.1 0 10 0.1 0.1 0\n", "Rank"),
    (header("all_reduce_perf", ["a"]) + "NCCL INFO NCCL_ALGO set by environment to ring,tree\n"
     "        1024           256     float     sum      -1    10.0   0.10   0.10      0    10.5   0.10   0.10      0\n",
     "not one config"),
])
def test_what_cannot_be_read_is_refused_saying_why(text, message):
    with pytest.raises(NcclTestsFormatError, match=message):
        parse_nccl_tests(text)

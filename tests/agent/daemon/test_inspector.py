"""The Inspector reader: record mapping, partial lines, new and rotated files, restarts."""

from __future__ import annotations

import json
import os

import pytest

from dynamiccl.agent.daemon.inspector import InspectorReader
from dynamiccl.agent_api import JOB_ID_FILE
from dynamiccl.schemas import NcclConfig


def coll(rank: int, sn: int, coll: str = "AllReduce", size: int = 1 << 20, exec_us: float = 500,
         comm: str = "0x7f8c496ae9f661", n_ranks: int = 16, nnodes: int = 2, timing: str = "kernel_gpu") -> dict:
    """A record as NCCL's writer (inspector_json.cc) lays it out: header with comm_name."""
    return {
        "header": {"id": comm, "comm_name": "default_pg", "rank": rank, "n_ranks": n_ranks, "nnodes": nnodes},
        "metadata": {"inspector_output_format_version": "v4.0", "git_rev": "", "rec_mechanism": "profiler_plugin",
                     "dump_timestamp_us": 1748030377748202, "hostname": "node-a", "pid": 1639453},
        "coll_perf": {"coll": coll, "coll_sn": sn, "coll_msg_size_bytes": size, "coll_exec_time_us": exec_us,
                      "coll_timing_source": timing, "coll_algobw_gbs": 277.21, "coll_busbw_gbs": 485.12},
    }


def p2p(rank: int, sn: int, op: str) -> dict:
    return {
        "header": {"id": "0xabc", "rank": rank, "n_ranks": 2, "nnodes": 2},
        "metadata": {"dump_timestamp_us": 1748030377748202, "hostname": "node-a", "pid": 1},
        "p2p_perf": {"p2p": op, "p2p_sn": sn, "p2p_peer": 1 - rank, "p2p_msg_size_bytes": 4096,
                     "p2p_exec_time_us": 42, "p2p_timing_source": "kernel_gpu",
                     "p2p_algobw_gbs": 1.0, "p2p_busbw_gbs": 1.0},
    }


def lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def reader(tmp_path, **kwargs) -> InspectorReader:
    return InspectorReader(tmp_path / "dumps", tmp_path / "state" / "inspector.json", **kwargs)


def test_records_become_measurements_once_per_call(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    # Every rank of the communicator writes the same two calls; only rank 0's count.
    for rank in range(4):
        (dumps / f"rank{rank}.log").write_text(lines(coll(rank, 1), coll(rank, 2, coll="AllGather", size=4096)))
    (dumps / "p2p.log").write_text(lines(p2p(0, 1, "Send"), p2p(1, 1, "Recv"), p2p(1, 2, "Send")))
    config = NcclConfig(algo="ring", proto="simple")
    got = reader(tmp_path, config=config, job_id="llama").poll()
    by_kind = sorted((m.context.collective.value, m.context.nbytes) for m in got)
    # allgather: Inspector writes the per-rank send size; NCCL's tuner counts the gathered total
    assert by_kind == [("allgather", 4096 * 16), ("allreduce", 1 << 20), ("sendrecv", 4096), ("sendrecv", 4096)]
    m = next(m for m in got if m.context.collective.value == "allreduce")
    assert (m.context.nranks, m.context.nnodes, m.latency_us, m.count) == (16, 2, 500.0, 1)
    assert m.source == "inspector" and m.config == config and m.job_id == "llama"
    assert m.ts == 1748030377.748202


def test_partial_last_line_is_read_once_complete(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    path = dumps / "rank0.log"
    full = json.dumps(coll(0, 2))
    path.write_text(lines(coll(0, 1)) + full[:40])
    r = reader(tmp_path)
    assert len(r.poll()) == 1
    assert r.poll() == []
    with path.open("a") as f:
        f.write(full[40:] + "\n")
    assert [m.context.nbytes for m in r.poll()] == [1 << 20]
    assert r.skipped == 0


def test_new_files_truncation_and_rotation(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    path = dumps / "rank0.log"
    path.write_text(lines(coll(0, 1), coll(0, 2)))
    r = reader(tmp_path)
    assert len(r.poll()) == 2
    (dumps / "sub").mkdir()
    (dumps / "sub" / "rank0-b.log").write_text(lines(coll(0, 1, comm="0x2")))
    assert len(r.poll()) == 1
    path.write_text(lines(coll(0, 3)))  # truncated in place and rewritten: shorter than the offset
    assert len(r.poll()) == 1
    with path.open("a") as f:
        f.write(lines(coll(0, 4)))
    os.rename(path, dumps / "rank0.log.1")  # rotated: the old file, renamed, keeps its offset
    path.write_text(lines(coll(0, 5), coll(0, 6), coll(0, 7)))
    got = r.poll()
    assert len(got) == 4  # the rest of the rotated file (one record) and the whole new file


def test_restart_resumes_from_saved_offsets(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    path = dumps / "rank0.log"
    path.write_text(lines(coll(0, 1), coll(0, 2)))
    assert len(reader(tmp_path).poll()) == 2
    with path.open("a") as f:
        f.write(lines(coll(0, 3)))
    again = reader(tmp_path)  # a restarted agent
    assert len(again.poll()) == 1
    assert reader(tmp_path).poll() == []


def test_garbage_lines_are_skipped(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    bad = coll(0, 2)
    bad["header"]["n_ranks"] = "many"
    (dumps / "rank0.log").write_text("not json\n[1, 2]\n" + lines(bad, coll(0, 3, exec_us=0), coll(0, 4)))
    r = reader(tmp_path)
    assert len(r.poll()) == 1 and r.skipped == 3


def test_corrupt_state_file_restarts_from_zero(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    (dumps / "rank0.log").write_text(lines(coll(0, 1)))
    state = tmp_path / "state" / "inspector.json"
    state.parent.mkdir()
    state.write_text("{not json")
    assert len(reader(tmp_path).poll()) == 1


def compact(*records: dict) -> str:
    """NCCL's writer: one record a line, no spaces."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def test_nvidias_documented_reduce_scatter_is_counted_as_nccl_counts_it(tmp_path):
    """NVIDIA's sample: ReduceScatter, 8 ranks, coll_msg_size_bytes 2 GiB, 41,057 us, algbw 418 GB/s
    (= 16 GiB / 41 ms): the tuner's and nccl-tests' size is the 16 GiB total."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    (dumps / "r0.log").write_text(compact(coll(0, 9, coll="ReduceScatter", size=2 << 30, exec_us=41057, n_ranks=8,
                                               nnodes=1)))
    (measurement,) = reader(tmp_path).poll()
    assert measurement.context.nbytes == 16 << 30
    assert 16 * 2**30 / (measurement.latency_us * 1e-6) / 1e9 == pytest.approx(418, rel=0.01)


def test_every_collective_name_nccl_writes(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    names = ["AllReduce", "AllGather", "ReduceScatter", "Broadcast", "Reduce", "All2All"]
    (dumps / "r0.log").write_text(compact(*(coll(0, i, coll=name, size=1024, n_ranks=4) for i, name in enumerate(names))))
    got = {m.context.collective.value: m.context.nbytes for m in reader(tmp_path).poll()}
    assert got == {"allreduce": 1024, "allgather": 4096, "reducescatter": 4096, "broadcast": 1024, "reduce": 1024,
                   "alltoall": 4096}


def test_pretty_printed_records_are_read_too_even_split_across_polls(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    text = json.dumps(coll(0, 1), indent=2) + "\n" + json.dumps(coll(0, 2), indent=2) + "\n"
    path = dumps / "r0.log"
    half = len(text) * 3 // 4  # the second record cut half-way, as a writer in progress leaves it
    path.write_text(text[:half])
    r = reader(tmp_path)
    assert [m.context.nbytes for m in r.poll()] == [1 << 20]
    path.write_text(text)
    assert [m.context.nbytes for m in r.poll()] == [1 << 20] and r.skipped == 0


def test_cpu_timed_records_are_counted_not_averaged_with_kernel_timings(tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    (dumps / "r0.log").write_text(compact(coll(0, 1), coll(0, 2, timing="collective_cpu"), coll(0, 3, timing="kernel_cpu")))
    r = reader(tmp_path)
    assert len(r.poll()) == 1 and r.cpu_timed == 2 and r.skipped == 0


def test_a_jobs_own_dump_folder_names_its_job(tmp_path):
    dumps = tmp_path / "dumps"
    (dumps / "llama-0412").mkdir(parents=True)
    (dumps / "llama-0412" / "r0.log").write_text(compact(coll(0, 1)))
    (dumps / "loose.log").write_text(compact(coll(0, 2)))
    got = sorted((m.job_id or "") for m in reader(tmp_path).poll())
    assert got == ["", "llama-0412"]
    configured = InspectorReader(dumps, tmp_path / "other-state.json", job_id="given")
    assert [m.job_id for m in configured.poll()] == ["given", "given"]  # a configured job id wins


def test_a_job_id_the_folder_name_could_not_hold_is_read_from_the_folder(tmp_path):
    """`dynamiccl launch --job team/llm:7` dumps into `team_llm_7` and writes the id beside the
    records, so Inspector's records and the hook's measurements name the same job."""
    dumps = tmp_path / "dumps"
    (dumps / "team_llm_7").mkdir(parents=True)
    (dumps / "team_llm_7" / JOB_ID_FILE).write_text("team/llm:7")
    (dumps / "team_llm_7" / "r0.log").write_text(compact(coll(0, 1)))
    assert [m.job_id for m in reader(tmp_path).poll()] == ["team/llm:7"]

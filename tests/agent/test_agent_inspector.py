"""The Inspector reader: record mapping, partial lines, new and rotated files, restarts."""

from __future__ import annotations

import json
import os

from dynamiccl.agent.inspector import InspectorReader
from dynamiccl.schemas import NcclConfig


def coll(rank: int, sn: int, coll: str = "AllReduce", size: int = 1 << 20, exec_us: float = 500,
         comm: str = "0x7f8c496ae9f661", n_ranks: int = 16, nnodes: int = 2) -> dict:
    return {
        "header": {"id": comm, "rank": rank, "n_ranks": n_ranks, "nnodes": nnodes},
        "metadata": {"inspector_output_format_version": "v4.0", "git_rev": "", "rec_mechanism": "profiler_plugin",
                     "dump_timestamp_us": 1748030377748202, "hostname": "node-a", "pid": 1639453},
        "coll_perf": {"coll": coll, "coll_sn": sn, "coll_msg_size_bytes": size, "coll_exec_time_us": exec_us,
                      "coll_timing_source": "kernel_gpu", "coll_algobw_gbs": 277.21, "coll_busbw_gbs": 485.12},
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
    assert by_kind == [("allgather", 4096), ("allreduce", 1 << 20), ("sendrecv", 4096), ("sendrecv", 4096)]
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

"""NCCL Inspector's Prometheus textfiles, as inspector_prom.cc writes them, read as measurements."""

from __future__ import annotations

import math
import os

import pytest

from dynamiccl.agent.daemon.inspector import InspectorReader
from dynamiccl.agent.daemon.inspector_prom import call_size, size_range
from dynamiccl.schemas import NcclConfig

GiB, MiB = 1 << 30, 1 << 20
#: Inspector's bus factor per collective (inspectorComputeOpBw), and whether its size is per rank.
FACTORS = {"AllReduce": lambda n: 2 * (n - 1) / n, "AllGather": lambda n: (n - 1) / n,
           "ReduceScatter": lambda n: (n - 1) / n, "Broadcast": lambda n: 1.0, "AllToAll": lambda n: 0.0}
PER_RANK = {"AllGather", "ReduceScatter", "AllToAll"}


def size_label(nbytes: int) -> str:
    """inspectorPromFormatMessageSizeRange."""
    if nbytes == 0:
        return "0B"
    units, value, index = ["B", "KB", "MB", "GB", "TB"], float(nbytes), 0
    while value >= 1024 and index < 4:
        value /= 1024
        index += 1
    lower = max(math.floor(max(value, 1.0)), 1)
    return f"{lower:.0f}-{lower + 1:.0f}{units[index]}"


def bucket(collective: str, msg_bytes: int, times_us: list[float], nranks: int = 16, nnodes: int = 2,
           gpu: int = 0, algo_proto: str = "Ring_LL128", job: str = "4242", comm: str = "default_pg") -> str:
    """One bucket's two lines, as inspectorPromWriteCollBucket prints them; `msg_bytes` is
    Inspector's size (per rank for allgather, reducescatter, alltoall)."""
    traffic = msg_bytes * nranks if collective in PER_RANK else msg_bytes
    bus = [traffic / 1e9 / (t / 1e6) * FACTORS[collective](nranks) for t in times_us]
    bus_gm = math.exp(sum(math.log(b) for b in bus) / len(bus)) if all(b > 0 for b in bus) else 0.0
    labels = (f'version="v5.1",slurm_job_id="{job}",node="node-a",gpu="GPU{gpu}",comm_name="{comm}",'
              f'n_nodes="{nnodes}",nranks="{nranks}",collective="{collective}",'
              f'message_size="{size_label(msg_bytes)}",algo_proto="{algo_proto}"')
    return (f"nccl_bus_bandwidth_gbs{{{labels}}} {bus_gm:.6g}\n"
            f"nccl_collective_exec_time_microseconds{{{labels}}} {sum(times_us) / len(times_us):.6g}\n")


def p2p_bucket(operation: str, msg_bytes: int, time_us: float, gpu: int = 0) -> str:
    labels = (f'version="v5.1",slurm_job_id="unknown",node="node-a",gpu="GPU{gpu}",comm_name="pp",'
              f'n_nodes="2",nranks="2",p2p_operation="{operation}",message_size="{size_label(msg_bytes)}"')
    bus = msg_bytes / 1e9 / (time_us / 1e6)
    return (f"nccl_p2p_bus_bandwidth_gbs{{{labels}}} {bus:.6g}\n"
            f"nccl_p2p_exec_time_microseconds{{{labels}}} {time_us:.6g}\n")


def reader(tmp_path, **kwargs) -> InspectorReader:
    (tmp_path / "dumps").mkdir(exist_ok=True)
    return InspectorReader(tmp_path / "dumps", tmp_path / "state" / "inspector.json", **kwargs)


def textfile(tmp_path, gpu: int, text: str) -> None:
    (tmp_path / "dumps" / f"nccl_inspector_metrics_GPU-{gpu:04d}.prom").write_text(text)


def test_each_bucket_is_one_measurement_of_the_job_with_its_size_recovered(tmp_path):
    follower = reader(tmp_path)
    for gpu in range(8):  # every GPU of the communicator on this node writes the bucket
        textfile(tmp_path, gpu, bucket("AllReduce", 48 * MiB + 4096, [900.0, 905.0], gpu=gpu))
    got = follower.poll()
    assert len(got) == 1  # once per node
    m = got[0]
    assert (m.context.collective.value, m.context.nranks, m.context.nnodes) == ("allreduce", 16, 2)
    assert m.context.nbytes == pytest.approx(48 * MiB + 4096, rel=1e-5)
    assert (m.latency_us, m.count, m.source, m.job_id) == (902.5, 1, "inspector", "4242")
    assert m.config == NcclConfig()  # what the job was told: NCCL's own choice
    assert follower.poll() == []  # nothing new


def test_per_rank_sizes_are_counted_as_api_md_counts_them(tmp_path):
    follower = reader(tmp_path)
    textfile(tmp_path, 0, bucket("ReduceScatter", 2 * GiB, [61974.0], nranks=8, nnodes=1)
             + bucket("AllToAll", 3 * MiB, [400.0], nranks=8, nnodes=1))
    got = {m.context.collective.value: m.context.nbytes for m in follower.poll()}
    assert got["reducescatter"] == pytest.approx(16 * GiB, rel=1e-5)  # 2 GiB a rank, 8 ranks
    # no bandwidth for alltoall: the middle of [3, 4) MiB a rank, times 8
    assert 24 * MiB <= got["alltoall"] < 32 * MiB


def test_a_bucket_run_with_another_pair_than_the_job_forced_is_left_out(tmp_path):
    follower = reader(tmp_path, config=NcclConfig(algo="ring", proto="ll"))
    textfile(tmp_path, 0, bucket("AllReduce", MiB, [50.0], algo_proto="Ring_LL")
             + bucket("AllReduce", 8 * MiB, [200.0], algo_proto="Tree_LL"))
    got = follower.poll()
    assert [m.context.nbytes for m in got] == [pytest.approx(MiB, rel=1e-5)]
    assert follower.other_config == 1


def test_a_transfer_counts_on_its_sending_side(tmp_path):
    follower = reader(tmp_path)
    textfile(tmp_path, 0, p2p_bucket("Send", 4 * MiB, 120.0) + p2p_bucket("Recv", 4 * MiB, 121.0))
    got = follower.poll()
    assert [(m.context.collective.value, m.latency_us, m.job_id) for m in got] == [("sendrecv", 120.0, None)]


def test_a_new_interval_is_read_whole_and_lines_appended_within_one_only(tmp_path):
    follower = reader(tmp_path)
    path = tmp_path / "dumps" / "nccl_inspector_metrics_GPU-0000.prom"
    path.write_text(bucket("AllGather", MiB, [80.0]))
    assert len(follower.poll()) == 1
    with path.open("a") as f:  # a second dump within the interval appends
        f.write(bucket("Broadcast", 2 * MiB, [60.0]) + "nccl_bus_bandwidth_gbs{partial")
    assert [m.context.collective.value for m in follower.poll()] == ["broadcast"]
    stat = path.stat()
    path.write_text(bucket("AllGather", MiB, [80.0]))  # the next interval rewrites the file, same calls
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 30_000_000_000))
    assert [m.context.collective.value for m in follower.poll()] == ["allgather"]
    restarted = reader(tmp_path)  # an agent restart resumes where it was
    assert restarted.poll() == []


def test_a_file_that_is_not_prometheus_text_is_counted_and_skipped(tmp_path):
    follower = reader(tmp_path)
    textfile(tmp_path, 0, "this is { not prometheus\n")
    assert follower.poll() == []
    assert follower.skipped == 1


def test_size_ranges_and_sizes():
    assert size_range("4-5MB") == (4 * MiB, 5 * MiB)
    assert size_range("1-2GB") == (GiB, 2 * GiB)
    assert size_range("512-513B") == (512, 513)
    with pytest.raises(ValueError, match="message_size 'big'"):
        size_range("big")
    # a bandwidth that would put the size outside its range is clamped to it
    assert call_size("allreduce", 8, "4-5MB", exec_us=100.0, busbw_gbs=1e6) == 5 * MiB - 1

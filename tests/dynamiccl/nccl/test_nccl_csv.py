"""The measurement CSV of NCCL's example tuner (optimize_config.py's input), read as measurements."""

from pathlib import Path

import pytest

from dynamiccl.nccl.nccl_csv import NcclCsvFormatError, parse_nccl_csv
from dynamiccl.schemas import Collective, NcclConfig

SAMPLE = Path(__file__).parent / "data" / "nvidia_sample_performance_data.csv"  # as NVIDIA ships it
HEADER = "collective,size_bytes,algorithm,protocol,channels,nodes,ranks,pipeOps,regBuff,cost_metric,bandwidth_gbps,latency_us\n"


def test_nvidias_sample_reads_row_for_row():
    measurements, refused = parse_nccl_csv(SAMPLE.read_text(), job_id="sample")
    assert len(measurements) == 23 and refused == []
    first = measurements[0]
    assert (first.context.collective, first.context.nbytes, first.context.nranks, first.context.nnodes) == (
        Collective.allreduce, 1024, 8, 1)
    assert first.config == NcclConfig(algo="tree", proto="simple", nchannels=2) and first.latency_us == 12.5
    assert {m.source for m in measurements} == {"bench"} and {m.job_id for m in measurements} == {"sample"}


def test_rows_that_cannot_be_measurements_are_refused_with_their_line():
    text = HEADER + (
        "allreduce,1024,ring,simple,-1,1,8,-1,-1,0.1,50,10.0\n"
        "allreduce,1024,ring,simple,4,-1,-1,-1,-1,0.1,50,10.0\n"  # any size of communicator
        "allreduce,1024,ring,simple,4,1,8,4,-1,0.1,50,10.0\n"  # 4 pipelined ops
        "allreduce,1024,warp,simple,4,1,8,-1,-1,0.1,50,10.0\n"
        "allreduce,1024,ring,simple,4,1,8,-1,-1,0.1,50,\n")  # no latency
    measurements, refused = parse_nccl_csv(text)
    assert len(measurements) == 1 and measurements[0].config.nchannels is None
    assert [row.line for row in refused] == [3, 4, 5, 6]
    assert "nodes and ranks" in refused[0].reason and "pipelined" in refused[1].reason
    assert "algo" in refused[2].reason


def test_another_csv_is_refused_naming_the_missing_columns():
    with pytest.raises(NcclCsvFormatError, match="latency_us"):
        parse_nccl_csv("collective,size_bytes,algorithm,protocol,channels,nodes,ranks\nallreduce,1,ring,ll,1,1,2\n")

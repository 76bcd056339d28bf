"""The simulated presets' default bus bandwidth against published nccl-tests figures.

Tolerance: +-25%. The figures come from other clusters (AWS EFA rather than InfiniBand,
other NCCL versions and topologies); the simulator must land in their range, not match a run.
"""

import pytest

from dynamiccl.nccl.cost_model import bus_bandwidth_gbs
from dynamiccl.schemas import Context, NcclConfig
from dynamiccl.sim import PRESETS, SimulatedFabric

TOLERANCE = 0.25


@pytest.mark.parametrize(
    ("preset", "nnodes", "nbytes", "published_busbw", "source"),
    [
        # crazyguitar/aws-gpu-communication-benchmark, data/nccl_all_reduce.csv (p5.48xlarge, 8x H100)
        ("h100-ib-2n", 2, 8 << 30, 477.7, "AWS p5, 2 nodes, all_reduce 8 GB"),
        ("h100-ib-16n", 8, 1 << 30, 274.5, "AWS p5, 8 nodes, all_reduce 1 GB"),
        # NVIDIA's published DGX H100 single-node all_reduce with NVLS (nccl-tests, ~450-480 GB/s)
        ("h100-ib-1n", 1, 8 << 30, 465.0, "DGX H100, 1 node, all_reduce 8 GB (NVLS)"),
        # DGX A100 single node all_reduce, large messages (~230 GB/s, NVIDIA nccl-tests figures)
        ("a100-ib-2n", 1, 8 << 30, 230.0, "DGX A100, 1 node, all_reduce 8 GB"),
    ],
)
def test_default_busbw_matches_published_nccl_tests(preset, nnodes, nbytes, published_busbw, source):
    fabric = PRESETS[preset].fabric
    context = Context(collective="allreduce", nbytes=nbytes, nranks=nnodes * fabric.gpus_per_node, nnodes=nnodes)
    busbw = bus_bandwidth_gbs(context, SimulatedFabric(PRESETS[preset]).true_latency_us(context, NcclConfig()))
    assert abs(busbw / published_busbw - 1) <= TOLERANCE, f"{source}: simulated {busbw:.1f} GB/s"

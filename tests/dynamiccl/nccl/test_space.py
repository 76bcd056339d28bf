"""Which configurations NCCL can run, per fabric and call (shared/design/NCCL.md)."""

import pytest

from dynamiccl.nccl import (
    InvalidConfig,
    candidate_configs,
    check_config,
    gpu_generation,
    is_valid,
    valid_algorithms,
)
from dynamiccl.nccl.space import GpuGeneration
from dynamiccl.schemas import Algo, Context, Fabric, NcclConfig, Proto

H100 = Fabric(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-ndr400",
              nics_per_node=8)
A100 = Fabric(gpu="A100-SXM4-80GB", gpus_per_node=8, intra_node="nvswitch",
              inter_node="ib-hdr200", nics_per_node=8)
L40S = Fabric(gpu="L40S", gpus_per_node=4, intra_node="pcie", inter_node="roce-200")
H100_SHARP = H100.model_copy(update={"sharp": True})


def ctx(collective="allreduce", nbytes=1 << 20, nranks=8, nnodes=1) -> Context:
    return Context(collective=collective, nbytes=nbytes, nranks=nranks, nnodes=nnodes)


@pytest.mark.parametrize(
    ("name", "generation"),
    [("H100-SXM", GpuGeneration.hopper), ("NVIDIA H200", GpuGeneration.hopper),
     ("GB200", GpuGeneration.blackwell), ("B200", GpuGeneration.blackwell),
     ("A100-SXM4-80GB", GpuGeneration.ampere), ("L40S", GpuGeneration.ampere),
     ("V100", GpuGeneration.volta), ("mystery-accelerator", GpuGeneration.volta)],
)
def test_gpu_generation_from_model_name(name, generation):
    assert gpu_generation(name) is generation


def test_nvls_only_on_hopper_nvswitch_and_only_simple():
    assert Algo.nvls in valid_algorithms(H100, ctx())
    assert Algo.nvls not in valid_algorithms(A100, ctx())
    assert is_valid(H100, ctx(), NcclConfig(algo="nvls", proto="simple"))
    assert not is_valid(H100, ctx(), NcclConfig(algo="nvls", proto="ll128"))


def test_nvls_tree_replaces_nvls_across_nodes():
    algos = valid_algorithms(H100, ctx(nranks=16, nnodes=2))
    assert Algo.nvls_tree in algos and Algo.nvls not in algos


def test_collnet_needs_sharp_and_several_nodes():
    multi = ctx(nranks=16, nnodes=2)
    assert Algo.collnet_direct not in valid_algorithms(H100, multi)
    assert Algo.collnet_direct in valid_algorithms(H100_SHARP, multi)
    assert Algo.collnet_direct not in valid_algorithms(H100_SHARP, ctx())


def test_pat_only_with_one_gpu_per_node():
    assert Algo.pat in valid_algorithms(H100, ctx("allgather", nranks=4, nnodes=4))
    assert Algo.pat not in valid_algorithms(H100, ctx("allgather", nranks=16, nnodes=2))
    with pytest.raises(InvalidConfig, match="pat"):
        check_config(H100, ctx("allgather", nranks=4, nnodes=4), NcclConfig(algo="pat", proto="ll"))


def test_tree_is_for_allreduce_only():
    with pytest.raises(InvalidConfig, match="algo tree cannot run allgather"):
        check_config(H100, ctx("allgather"), NcclConfig(algo="tree"))


def test_ll128_needs_nvlink_class_links():
    assert not is_valid(L40S, ctx(nranks=4), NcclConfig(proto="ll128"))
    assert is_valid(L40S, ctx(nranks=4), NcclConfig(proto="ll"))
    assert is_valid(A100, ctx(), NcclConfig(algo="ring", proto="ll128"))


def test_point_to_point_takes_only_channels():
    assert is_valid(H100, ctx("alltoall"), NcclConfig(nchannels=8))
    with pytest.raises(InvalidConfig, match="point-to-point"):
        check_config(H100, ctx("sendrecv"), NcclConfig(algo="ring"))


def test_one_rank_communicator_only_takes_the_default():
    single = ctx(nranks=1, nnodes=1)
    assert candidate_configs(H100, single) == (NcclConfig(),)
    assert not is_valid(H100, single, NcclConfig(nchannels=2))


@pytest.mark.parametrize("fabric", [H100, A100, L40S, H100_SHARP])
@pytest.mark.parametrize("collective", ["allreduce", "allgather", "reducescatter", "broadcast",
                                        "reduce", "alltoall", "sendrecv"])
@pytest.mark.parametrize(("nranks", "nnodes"), [(8, 1), (16, 2), (4, 4)])
def test_candidates_are_all_valid_unique_and_start_with_the_default(fabric, collective, nranks, nnodes):
    context = ctx(collective, nranks=nranks, nnodes=nnodes)
    candidates = candidate_configs(fabric, context)
    assert candidates[0].is_default
    assert len({c.key() for c in candidates}) == len(candidates)
    assert all(is_valid(fabric, context, c) for c in candidates)
    assert len(candidates) > 1


def test_ring_is_always_a_candidate_for_collectives():
    for collective in ("allreduce", "allgather", "reducescatter", "broadcast", "reduce"):
        algos = {c.algo for c in candidate_configs(L40S, ctx(collective, nranks=4))}
        assert Algo.ring in algos
        assert Proto.ll128 not in {c.proto for c in candidate_configs(L40S, ctx(collective, nranks=4))}

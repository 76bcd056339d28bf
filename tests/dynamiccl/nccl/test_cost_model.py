"""NCCL's own cost model: what NCCL picks by default, and what a setting makes it run."""

import math

import pytest

from dynamiccl.nccl.cost_model import NcclCostModel, bus_bandwidth_gbs
from dynamiccl.nccl.env import EnvSetting, render_env
from dynamiccl.nccl.space import valid_algorithms
from dynamiccl.nccl.space import InvalidConfig, is_valid
from dynamiccl.schemas import Algo, Collective, Context, Fabric, NcclConfig, Proto

H100 = NcclCostModel(Fabric(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch",
                            inter_node="ib-ndr400", nics_per_node=8))
L40S = NcclCostModel(Fabric(gpu="L40S", gpus_per_node=4, intra_node="pcie", inter_node="roce-200"))


def ctx(nbytes, collective="allreduce", nranks=8, nnodes=1):
    return Context(collective=collective, nbytes=nbytes, nranks=nranks, nnodes=nnodes)


def test_large_single_node_allreduce_on_hopper_nvswitch_uses_nvls():
    assert H100.default(ctx(1 << 30)) == NcclConfig(algo="nvls", proto="simple", nchannels=16)


def test_small_messages_use_ll_and_fewer_channels():
    small = H100.default(ctx(4096))
    assert small.proto is Proto.ll
    assert small.nchannels < H100.default_channels(small.algo, nnodes=1)


def test_across_nodes_small_allreduce_prefers_tree():
    assert H100.default(ctx(1024, nranks=16, nnodes=2)).algo is Algo.tree


def test_pcie_never_gets_ll128():
    for size in (1 << 10, 1 << 20, 1 << 30):
        assert L40S.default(ctx(size, nranks=4)).proto is not Proto.ll128


def test_every_default_is_a_valid_config():
    for model in (H100, L40S):
        for collective in ("allreduce", "allgather", "reducescatter", "broadcast", "reduce"):
            for nnodes in (1, 2, 4):
                for size in (1 << 10, 1 << 20, 1 << 30):
                    context = ctx(size, collective, nranks=nnodes * model.fabric.gpus_per_node, nnodes=nnodes)
                    assert is_valid(model.fabric, context, model.default(context))


def test_resolve_keeps_what_it_is_told_and_fills_the_rest():
    resolved = H100.resolve(ctx(1 << 20), NcclConfig(algo="ring"))
    assert resolved.algo is Algo.ring and resolved.proto is not None and resolved.nchannels
    assert H100.resolve(ctx(1 << 20), NcclConfig(algo="ring", proto="simple", nchannels=3)).nchannels == 3


def test_time_grows_with_size_and_is_infinite_for_unusable_pairs():
    times = [H100.time_us(ctx(s), Algo.ring, Proto.simple, None) for s in (1 << 10, 1 << 20, 1 << 30)]
    assert times == sorted(times)
    assert math.isinf(L40S.time_us(ctx(1 << 20, nranks=4), Algo.ring, Proto.ll128, 2))


def test_env_restricts_algorithm_protocol_and_channels_like_nccl():
    env = render_env(EnvSetting(algos={Collective.allreduce: Algo.ring}, protos={Collective.allreduce: Proto.simple},
                                nchannels=8))
    big = H100.resolve_env(ctx(1 << 30), env)
    assert big == NcclConfig(algo="ring", proto="simple", nchannels=8)
    assert H100.resolve_env(ctx(1024), env).nchannels < 8, "small calls still get fewer channels"
    allgather = H100.resolve_env(ctx(1 << 30, "allgather"), env)
    assert allgather.nchannels == 8, "the channel count is process-wide"
    unrestricted = H100.resolve_env(ctx(1 << 30, "allgather"), render_env(EnvSetting(nchannels=8)))
    assert allgather == unrestricted, "NCCL_ALGO for allreduce leaves allgather to NCCL"


def test_a_users_exclusion_and_channel_cap_leave_nccl_the_cheapest_of_the_rest():
    call = ctx(1 << 30)
    default = H100.default(call)
    env = {"NCCL_ALGO": f"^{default.algo.value}", "NCCL_MAX_CTAS": "4"}
    chosen = H100.resolve_env(call, env)
    assert chosen.algo != default.algo and chosen.nchannels <= 4
    rest = [(a, p) for a in valid_algorithms(H100.fabric, call) if a != default.algo for p in Proto
            if H100.usable(call, a, p)]
    assert (chosen.algo, chosen.proto) == min(rest, key=lambda pair: H100.time_us(call, *pair, None))


def test_dynamiccl_plugin_leaves_calls_no_rule_applies_to_and_minus_one_channels_to_nccl():
    rules = "allreduce,0,65536,ring,ll,4,-1,-1\nallreduce,65537,1099511627776,tree,simple,-1,-1,-1\n"
    assert H100.resolve_rules(ctx(1024), rules) == NcclConfig(algo="ring", proto="ll", nchannels=4)
    tree = H100.resolve_rules(ctx(1 << 30), rules)
    assert tree == H100.resolve(ctx(1 << 30), NcclConfig(algo="tree", proto="simple")), "NCCL's own channels"
    assert tree.nchannels > 1
    unmatched = ctx(1024, "broadcast")
    assert H100.resolve_rules(unmatched, rules) == H100.default(unmatched)
    nvls_first = "allgather,0,1099511627776,nvls,simple,16,-1,-1\nallgather,0,1099511627776,ring,simple,8,-1,-1\n"
    across = ctx(1 << 20, "allgather", nranks=16, nnodes=2)  # NVLS cannot run it: the next rule applies
    assert H100.resolve_rules(across, nvls_first) == NcclConfig(algo="ring", proto="simple", nchannels=8)
    assert H100.resolve_rules(across, nvls_first.splitlines()[0]) == H100.default(across)  # none left: NCCL


def test_rules_apply_by_size_and_otherwise_the_example_plugin_answers_one_channel():
    # plugins/tuner/example/plugin.c starts with `*nChannels = 1` and NCCL (enqueue.cc) uses any
    # non-zero answer: despite its README, channels -1 and unmatched calls run on ONE channel.
    rules = "allreduce,0,65536,ring,ll,4,-1,-1\nallreduce,65537,1099511627776,tree,simple,-1,-1,-1\n"
    example = {"example_plugin": True}
    assert H100.resolve_rules(ctx(1024), rules, **example) == NcclConfig(algo="ring", proto="ll", nchannels=4)
    assert H100.resolve_rules(ctx(1 << 30), rules, **example) == NcclConfig(algo="tree", proto="simple", nchannels=1)
    unmatched = ctx(1024, "broadcast")
    assert H100.resolve_rules(unmatched, rules, **example) == H100.default(unmatched).model_copy(update={"nchannels": 1})
    nvls_rule = "allgather,0,1099511627776,nvls,simple,16,-1,-1\nallgather,0,1099511627776,ring,simple,8,-1,-1\n"
    across = ctx(1 << 20, "allgather", nranks=16, nnodes=2)  # NVLS cannot run it: the plugin tries the next rule
    assert H100.resolve_rules(across, nvls_rule, **example) == NcclConfig(algo="ring", proto="simple", nchannels=8)


def test_env_nccl_cannot_satisfy_fails_the_call():
    env = render_env(EnvSetting(algos={Collective.allreduce: Algo.nvls}))
    assert H100.resolve_env(ctx(1 << 30), env).algo is Algo.nvls
    with pytest.raises(InvalidConfig, match="NCCL fails allreduce"):
        H100.resolve_env(ctx(1 << 30, nranks=16, nnodes=2), env)  # NVLS across nodes needs CollNet


def test_default_channel_counts_follow_the_topology_search():
    assert H100.topology.channels(1) == 32  # 16 search channels at 22.5 GB/s, duplicated
    assert H100.topology.channels(2) == 16  # one search channel per NIC, duplicated
    assert H100.default_channels(Algo.nvls, 1) == 16
    assert L40S.topology.channels(2) == 2


def test_bus_bandwidth_follows_nccl_tests_factors():
    assert bus_bandwidth_gbs(ctx(8_000_000_000), 1e6) == 8.0 * 2 * 7 / 8
    assert bus_bandwidth_gbs(ctx(8_000_000_000, "broadcast"), 1e6) == 8.0

"""Per-size tuner rules built from per-context recommendations."""

from dynamiccl.nccl import first_match, parse_rules, render_rules
from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.schemas import Context, Fabric, NcclConfig
from dynamiccl.server.learner.workload import tuner_rules as build_rules

NCCL = NcclCostModel(Fabric(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-ndr400",
                            nics_per_node=8))


def tuner_rules(contexts, configs):
    return build_rules(contexts, configs, NCCL.resolve)

RING = NcclConfig(algo="ring", proto="simple", nchannels=16)
TREE = NcclConfig(algo="tree", proto="ll", nchannels=8)


def ctx(nbytes, collective="allreduce", nranks=16, nnodes=2):
    return Context(collective=collective, nbytes=nbytes, nranks=nranks, nnodes=nnodes)


def test_each_recommended_size_is_matched_by_its_own_config():
    contexts = [ctx(1 << 10), ctx(1 << 20), ctx(1 << 30), ctx(1 << 20, "allgather")]
    configs = [TREE, RING, RING, RING]
    rules = parse_rules(render_rules(tuner_rules(contexts, configs)))
    for context, config in zip(contexts, configs):
        assert first_match(rules, context).config == config


def test_adjacent_sizes_with_the_same_choice_merge_into_one_rule():
    contexts = [ctx(1 << 10), ctx(1 << 12), ctx(1 << 20), ctx(1 << 30)]
    rules = tuner_rules(contexts, [TREE, TREE, RING, RING])
    assert [(r.algo.value, r.min_bytes) for r in rules] == [("tree", 0), ("ring", 2**16 + 1)]
    assert rules[-1].max_bytes == (1 << 63) - 1


def test_what_is_left_to_nccl_is_spelled_out_as_nccl_would_pick_it():
    """With the example plugin loaded, an unmatched call or channels -1 would run on one channel."""
    rules = tuner_rules([ctx(1 << 10), ctx(1 << 20)], [NcclConfig(), NcclConfig(algo="ring", proto="simple")])
    assert first_match(rules, ctx(1 << 10)).config == NCCL.default(ctx(1 << 10))
    assert first_match(rules, ctx(1 << 20)).nchannels == NCCL.resolve(ctx(1 << 20), NcclConfig(algo="ring", proto="simple")).nchannels


def test_rules_are_scoped_to_the_node_and_rank_counts_they_were_learned_on():
    rules = tuner_rules([ctx(1 << 20)], [RING])
    assert first_match(rules, ctx(1 << 20, nranks=32, nnodes=4)) is None


def test_point_to_point_calls_get_no_rules():
    assert tuner_rules([ctx(1 << 20, "alltoall")], [NcclConfig(nchannels=8)]) == []

"""Per-step collective traces of transformer training layouts."""

import pytest

from dynamiccl.schemas import Collective
from dynamiccl.workloads.trace import (
    LLAMA3_8B,
    Layout,
    ModelShape,
    block_parameters,
    stage_parameters,
    step_trace,
    weighted_contexts,
)

TINY = ModelShape(layers=4, hidden=64, ffn_hidden=256, heads=4, kv_heads=4, vocab=1000)


def by_kind(trace):
    return {(e.parallelism, e.context.collective, e.context.nbytes): e for e in trace}


def test_tensor_parallel_all_reduces_activations_four_times_per_layer_and_micro_batch():
    layout = Layout(tp=8, micro_batches=2, micro_batch_size=1, seq_len=8192)
    activation = 8192 * 4096 * 2
    entry = by_kind(step_trace(LLAMA3_8B, layout))[("tp", Collective.allreduce, activation)]
    assert entry.calls == 4 * 32 * 2 + 2 + 2, "plus the embedding's forward and the output layer's backward"
    assert (entry.context.nranks, entry.context.nnodes) == (8, 1)


def test_dtensor_tensor_parallelism_all_reduces_seven_times_per_layer_and_micro_batch_and_nothing_else():
    layout = Layout(tp=8, micro_batches=2, micro_batch_size=1, seq_len=8192, dtensor=True)
    trace = step_trace(LLAMA3_8B, layout)
    assert [(e.context.collective, e.context.nbytes, e.calls) for e in trace] == [
        (Collective.allreduce, 8192 * 4096 * 2, (2 + 5) * 32 * 2)]  # replicated embedding, output and loss


def test_vocab_parallel_cross_entropy_all_reduces_three_fp32_values_a_token_on_the_last_stage():
    layout = Layout(tp=2, pp=2, micro_batches=3, micro_batch_size=2, seq_len=16)
    last = by_kind(step_trace(TINY, layout, stage=1))
    assert last[("tp", Collective.allreduce, 2 * 16 * 4)].calls == 3 * 3
    assert not any(nbytes == 2 * 16 * 4 for _, _, nbytes in by_kind(step_trace(TINY, layout, stage=0)))


def test_sequence_parallel_trades_each_all_reduce_for_an_all_gather_and_a_reduce_scatter():
    activation = 16 * 64 * 2
    plain = by_kind(step_trace(TINY, Layout(tp=2, seq_len=16)))
    sp = by_kind(step_trace(TINY, Layout(tp=2, seq_len=16, sequence_parallel=True)))
    # 4 layers x (2 forward + 2 backward), plus the embedding's and the output layer's reductions
    assert sp[("tp", Collective.allgather, activation)].calls == 4 * 4 + 2
    assert sp[("tp", Collective.reducescatter, activation)].calls == 4 * 4 + 2
    assert plain[("tp", Collective.allreduce, activation)].calls == 4 * 4 + 2
    norms = (2 * 4 + 1) * 64 * 2  # 2 norms a layer and the final one, bf16 gradients
    assert sp[("tp", Collective.allreduce, norms)].calls == 1
    assert ("tp", Collective.allreduce, activation) not in sp


def test_pipeline_stages_exchange_activations_with_their_neighbours():
    layout = Layout(pp=4, tp=4, gpus_per_node=8, micro_batches=8, seq_len=16)
    middle = [e for e in step_trace(TINY, layout, stage=1) if e.parallelism == "pp"]
    assert len(middle) == 2 and all(e.calls == 2 * 8 and e.context.nranks == 2 for e in middle)
    assert sorted(e.context.nnodes for e in middle) == [1, 2], "stage 1 shares a node with 0, not with 2"
    assert len([e for e in step_trace(TINY, layout, stage=0) if e.parallelism == "pp"]) == 1


def test_data_parallel_all_reduces_the_stage_gradients_in_buckets():
    layout = Layout(dp=16, tp=8, gpus_per_node=8, bucket_bytes=1 << 20)
    dp = [e for e in step_trace(LLAMA3_8B, layout) if e.parallelism == "dp"]
    total = sum(e.context.nbytes * e.calls for e in dp)
    norms = 32 * 2 * LLAMA3_8B.hidden + LLAMA3_8B.hidden
    split = 32 * LLAMA3_8B.layer_params + 2 * LLAMA3_8B.vocab * LLAMA3_8B.hidden - 32 * 2 * LLAMA3_8B.hidden
    assert total == (-(-split // 8) + norms) * 2, "split weights sharded over TP, norms replicated"
    assert {e.context.nbytes for e in dp} == {1 << 20, total % (1 << 20)}
    assert all(e.context.nranks == 16 and e.context.nnodes == 16 for e in dp)


def test_fsdp2_gathers_each_block_twice_a_micro_batch_and_reduce_scatters_each_unit_once_a_step():
    layout = Layout(dp=8, tp=8, pp=2, gpus_per_node=8, micro_batches=4, fsdp=True)
    ddp = Layout(dp=8, tp=8, pp=2, gpus_per_node=8, micro_batches=4, bucket_bytes=1 << 40)
    block = block_parameters(LLAMA3_8B, layout) * 2  # bf16 bytes of one block's shard over TP
    for stage in (0, 1):
        root = stage_parameters(LLAMA3_8B, layout, stage) * 2 - 16 * block  # embedding or output, norm
        dp = {(e.context.collective, e.context.nbytes): e.calls
              for e in step_trace(LLAMA3_8B, layout, stage) if e.parallelism == "dp"}
        assert dp == {(Collective.allgather, block): 16 * 2 * 4,  # 16 blocks, forward and backward, 4 micro
                      (Collective.allgather, root): 4,  # the root unit, kept from forward to backward
                      (Collective.reducescatter, block): 16, (Collective.reducescatter, root): 1}
        [all_reduce] = [e for e in step_trace(LLAMA3_8B, ddp, stage) if e.parallelism == "dp"]
        assert 16 * block + root == all_reduce.context.nbytes, "each gradient reduced once, as DDP does"


def test_weighted_contexts_sum_the_calls_of_each_context():
    trace = step_trace(TINY, Layout(tp=2, dp=2, seq_len=16))
    weighted = weighted_contexts(trace)
    assert sum(c.weight for c in weighted) == sum(e.calls for e in trace)
    assert len({c.plain() for c in weighted}) == len(weighted)


def test_layouts_that_cannot_run_are_refused():
    with pytest.raises(ValueError, match="pipeline stages"):
        step_trace(TINY, Layout(pp=3))
    with pytest.raises(ValueError, match="tp must be >= 1"):
        Layout(tp=0)

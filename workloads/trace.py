"""Collective trace of one training step of a GPT/Llama-style model under DP x TP x PP.

Megatron-style layout: tensor-parallel ranks are adjacent (innermost), then
data-parallel, then pipeline stages, so global rank = tp + TP * (dp + DP * pp)
and a node holds `gpus_per_node` consecutive ranks. Per step, on one rank:

* TP: per layer and micro-batch, 2 all-reduces forward (attention and MLP
  outputs) and 2 backward, each of micro_batch x seq x hidden activations;
  with sequence parallelism each all-reduce becomes an all-gather plus a
  reduce-scatter of the same total size. Per micro-batch, the
  vocabulary-parallel embedding adds one forward all-reduce on the first
  stage; the vocabulary-parallel output layer one backward all-reduce of
  activations and, for its cross entropy, three fp32 all-reduces of one value
  a token (max logit, sum of exponentials, target logit) on the last stage.
  Under sequence parallelism those two activation all-reduces are each an
  all-gather plus a reduce-scatter, and the norms' gradients (computed on
  sequence shards) are summed over the group in one all-reduce a step.
  With `dtensor` (DTensor's `parallelize_module` of the blocks only,
  workloads/dtensor.py): per layer and micro-batch, 2 all-reduces forward
  and 5 backward (each column-split projection reduces its input gradient),
  and none for the replicated embedding, output layer and loss.
* PP: a point-to-point call per micro-batch and direction across each of the
  stage's boundaries (activations forward, gradients back; divided by TP
  under sequence parallelism), on the two-rank group of the pair.
* DP: the stage's gradients (its shard of the parameters; norms are
  replicated across TP) all-reduced once a step from one flat buffer, in
  `bucket_bytes` buckets. With `fsdp` (FSDP2: `fully_shard` of each block,
  then of the stage, whose own parameters make the root unit): a block's
  parameters all-gathered before its forward and again before its backward
  (resharded after forward) in every micro-batch, the root's once a
  micro-batch (kept for its backward), and each unit's gradients
  reduce-scattered once a step, after the last micro-batch (up to FSDP2's
  padding of each parameter's first dimension to a multiple of DP).

Sizes are counted as NCCL counts them (`Context.nbytes`): the all-reduced
buffer, the gathered output, the reduce-scatter input.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from dynamiccl.schemas import Collective, Context, WeightedContext

_FP32 = 4
#: Per block and micro-batch, the all-reduces of DTensor's tensor parallelism (workloads/dtensor.py).
DTENSOR_FORWARD_ALL_REDUCES, DTENSOR_BACKWARD_ALL_REDUCES = 2, 5


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    ffn_hidden: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * (self.hidden + 2 * self.kv_heads * head_dim) + self.hidden * self.hidden
        return attention + 3 * self.hidden * self.ffn_hidden + 2 * self.hidden  # SwiGLU MLP, 2 norms


LLAMA3_8B = ModelShape(layers=32, hidden=4096, ffn_hidden=14336, heads=32, kv_heads=8, vocab=128256)
LLAMA3_70B = ModelShape(layers=80, hidden=8192, ffn_hidden=28672, heads=64, kv_heads=8, vocab=128256)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    gpus_per_node: int = 8
    micro_batches: int = 1
    micro_batch_size: int = 1
    seq_len: int = 4096
    dtype_bytes: int = 2  # bf16 activations
    grad_bytes: int = 2  # gradients all-reduced in bf16
    sequence_parallel: bool = False
    bucket_bytes: int = 25 * 1024 * 1024  # DDP's default bucket cap
    fsdp: bool = False  # data parallelism by FSDP2 instead of DDP's all-reduce
    dtensor: bool = False  # tensor parallelism by DTensor's parallelize_module (blocks only)

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "gpus_per_node", "micro_batches", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, tp: int, dp: int, pp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def nodes_of(self, ranks: list[int]) -> int:
        return len({r // self.gpus_per_node for r in ranks})


@dataclass(frozen=True)
class TraceEntry:
    """`calls` calls a step of one kind of collective, on the group `context` describes."""

    context: Context
    calls: int
    parallelism: str  # "tp", "pp" or "dp"


def step_trace(model: ModelShape, layout: Layout, stage: int = 0) -> list[TraceEntry]:
    """The collectives one rank of pipeline stage `stage` issues in one training step."""
    if model.layers % layout.pp:
        raise ValueError(f"{model.layers} layers do not split into {layout.pp} pipeline stages")
    if not 0 <= stage < layout.pp:
        raise ValueError(f"stage must be 0 to {layout.pp - 1}")
    entries: Counter[tuple[Context, str]] = Counter()
    layers = model.layers // layout.pp
    micro = layout.micro_batches
    activation = layout.micro_batch_size * layout.seq_len * model.hidden * layout.dtype_bytes

    if layout.tp > 1 and layout.dtensor:
        tp_group = [layout.rank(t, 0, stage) for t in range(layout.tp)]
        shape = dict(nranks=layout.tp, nnodes=layout.nodes_of(tp_group))
        entries[(Context(collective=Collective.allreduce, nbytes=activation, **shape), "tp")] += \
            (DTENSOR_FORWARD_ALL_REDUCES + DTENSOR_BACKWARD_ALL_REDUCES) * layers * micro
    elif layout.tp > 1:
        tp_group = [layout.rank(t, 0, stage) for t in range(layout.tp)]
        shape = dict(nranks=layout.tp, nnodes=layout.nodes_of(tp_group))
        per_step = 4 * layers * micro  # 2 forward + 2 backward per layer and micro-batch
        if layout.sequence_parallel:
            entries[(Context(collective=Collective.allgather, nbytes=activation, **shape), "tp")] += per_step
            entries[(Context(collective=Collective.reducescatter, nbytes=activation, **shape), "tp")] += per_step
        else:
            entries[(Context(collective=Collective.allreduce, nbytes=activation, **shape), "tp")] += per_step
        # The embedding's forward reduction and the output layer's backward one: an all-reduce each,
        # or under sequence parallelism a reduce-scatter plus, the other way, an all-gather.
        ends = (stage == 0) + (stage == layout.pp - 1)
        if layout.sequence_parallel:
            entries[(Context(collective=Collective.allgather, nbytes=activation, **shape), "tp")] += ends * micro
            entries[(Context(collective=Collective.reducescatter, nbytes=activation, **shape), "tp")] += ends * micro
            norm_bytes = stage_norm_parameters(model, layout, stage) * layout.grad_bytes
            norm_grads = Context(collective=Collective.allreduce, nbytes=norm_bytes, **shape)
            entries[(norm_grads, "tp")] += 1  # the norms' gradients, summed over the sequence shards
        else:
            entries[(Context(collective=Collective.allreduce, nbytes=activation, **shape), "tp")] += ends * micro
        if stage == layout.pp - 1:
            per_token = layout.micro_batch_size * layout.seq_len * _FP32
            entries[(Context(collective=Collective.allreduce, nbytes=per_token, **shape), "tp")] += 3 * micro

    if layout.pp > 1:
        sent = activation // layout.tp if layout.sequence_parallel else activation
        for neighbour in (stage - 1, stage + 1):
            if 0 <= neighbour < layout.pp:
                pair = [layout.rank(0, 0, stage), layout.rank(0, 0, neighbour)]
                context = Context(collective=Collective.sendrecv, nbytes=sent, nranks=2, nnodes=layout.nodes_of(pair))
                entries[(context, "pp")] += 2 * micro  # activations one way, gradients the other

    if layout.dp > 1 and layout.fsdp:
        dp_group = [layout.rank(0, d, stage) for d in range(layout.dp)]
        shape = dict(nranks=layout.dp, nnodes=layout.nodes_of(dp_group))
        block = block_parameters(model, layout)
        root = stage_parameters(model, layout, stage) - layers * block
        for unit, gathers, reductions in ((block, 2 * micro * layers, layers), (root, micro, 1)):
            if unit:
                gathered = Context(collective=Collective.allgather, nbytes=unit * layout.dtype_bytes, **shape)
                reduced = Context(collective=Collective.reducescatter, nbytes=unit * layout.grad_bytes, **shape)
                entries[(gathered, "dp")] += gathers
                entries[(reduced, "dp")] += reductions
    elif layout.dp > 1:
        grad_bytes = stage_parameters(model, layout, stage) * layout.grad_bytes
        dp_group = [layout.rank(0, d, stage) for d in range(layout.dp)]
        shape = dict(nranks=layout.dp, nnodes=layout.nodes_of(dp_group))
        full, rest = divmod(grad_bytes, layout.bucket_bytes)
        if full:
            entries[(Context(collective=Collective.allreduce, nbytes=layout.bucket_bytes, **shape), "dp")] += full
        if rest:
            entries[(Context(collective=Collective.allreduce, nbytes=rest, **shape), "dp")] += 1

    return [TraceEntry(context, calls, kind) for (context, kind), calls in entries.items()]


def stage_norm_parameters(model: ModelShape, layout: Layout, stage: int) -> int:
    """The norms' parameters on one rank of `stage` (replicated across tensor-parallel ranks)."""
    norms = 2 * model.hidden * (model.layers // layout.pp)
    return norms + (model.hidden if stage == layout.pp - 1 else 0)  # the final norm on the last stage


def block_parameters(model: ModelShape, layout: Layout) -> int:
    """Parameters of one transformer block on one rank: its shard of the split weights, and its two
    norms (replicated across tensor-parallel ranks)."""
    return math.ceil((model.layer_params - 2 * model.hidden) / layout.tp) + 2 * model.hidden


def stage_parameters(model: ModelShape, layout: Layout, stage: int) -> int:
    """Parameters one rank of `stage` holds: its shard of the split weights, plus the norms."""
    split = (model.layer_params - 2 * model.hidden) * (model.layers // layout.pp)
    if stage == 0:
        split += model.vocab * model.hidden
    if stage == layout.pp - 1:
        split += model.vocab * model.hidden
    return math.ceil(split / layout.tp) + stage_norm_parameters(model, layout, stage)


def weighted_contexts(trace: list[TraceEntry]) -> list[WeightedContext]:
    """The trace as `/v1/recommend` contexts, each weighted by its calls per step."""
    calls: Counter[Context] = Counter()
    for entry in trace:
        calls[entry.context] += entry.calls
    return [context.weighted(float(n)) for context, n in calls.items()]

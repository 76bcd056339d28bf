"""Megatron-style tensor parallelism on plain torch.distributed collectives (gloo or NCCL).

A tensor-parallel group of `size` ranks splits each linear layer of a block:
the first of a pair by output columns, the second by input rows, so a block
needs one all-reduce forward (after the row-parallel layer, `reduce_from`)
and one backward (before the column-parallel ones, `copy_to`). The
embedding and the output layer are split by vocabulary; the loss is the
vocabulary-parallel cross entropy, which all-reduces three small fp32
tensors a micro-batch (max logit, sum of exponentials, target logit).

With `group=None` (one rank) every layer is the plain dense one and no
collective is issued, so the single-process model is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group; with `sequence_parallel`, activations between
    the split layers are split along the sequence too (Megatron's sequence parallelism)."""

    group: Any = None  # a ProcessGroup, or None for a single rank
    rank: int = 0
    size: int = 1
    sequence_parallel: bool = False

    @property
    def splits_sequence(self) -> bool:
        return self.sequence_parallel and self.size > 1

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `full` along `dim` (which must split evenly)."""
        if full.shape[dim] % self.size:
            raise ValueError(f"dimension of {full.shape[dim]} does not split over {self.size} tensor-parallel ranks")
        return full.chunk(self.size, dim=dim)[self.rank].clone()


class _CopyTo(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (Megatron's `f`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.tp.all_reduce(grad.contiguous()), None


class _ReduceFrom(torch.autograd.Function):
    """All-reduce forward, identity backward (Megatron's `g`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        return tp.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _gather_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """[b, s/tp, h] on each rank -> [b, s, h] (ranks' shards in rank order)."""
    local = x.transpose(0, 1).contiguous()
    full = local.new_empty((local.shape[0] * tp.size, *local.shape[1:]))
    dist.all_gather_into_tensor(full, local, group=tp.group)
    return full.transpose(0, 1)


def _reduce_scatter_sequence(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """[b, s, h] partial sums on each rank -> this rank's [b, s/tp, h] shard of their sum."""
    full = x.transpose(0, 1).contiguous()
    if full.shape[0] % tp.size:
        raise ValueError(f"a sequence of {full.shape[0]} does not split over {tp.size} tensor-parallel ranks")
    local = full.new_empty((full.shape[0] // tp.size, *full.shape[1:]))
    dist.reduce_scatter_tensor(local, full, group=tp.group)
    return local.transpose(0, 1)


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence forward, reduce-scatter of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        ctx.tp = tp
        return _gather_sequence(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_sequence(grad, ctx.tp), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Reduce-scatter along the sequence forward, all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        ctx.tp = tp
        return _reduce_scatter_sequence(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_sequence(grad, ctx.tp), None


def copy_to(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Into a column-parallel layer: the full input on every rank (gathered along the sequence
    under sequence parallelism); the gradient is summed over the ranks backward."""
    if tp.splits_sequence:
        return _GatherSequence.apply(x, tp)
    return _CopyTo.apply(x, tp) if tp.size > 1 else x


def reduce_from(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Out of a row-parallel layer: the partial products summed over the ranks (and left split
    along the sequence under sequence parallelism)."""
    if tp.splits_sequence:
        return _ReduceScatterSequence.apply(x, tp)
    return _ReduceFrom.apply(x, tp) if tp.size > 1 else x


class _ShardedLinear(nn.Linear):
    """A bias-free `nn.Linear` holding this rank's shard of `full_weight` along `dim` (with one
    rank, the whole layer: then DTensor's `parallelize_module` can split it instead)."""

    def __init__(self, full_weight: torch.Tensor, tp: TensorParallel, dim: int) -> None:
        shard = tp.shard(full_weight, dim=dim)
        super().__init__(shard.shape[1], shard.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(shard)


class ColumnParallelLinear(_ShardedLinear):
    """y_local = x @ W[cols of this rank]^T (no bias): the output stays split across ranks."""

    def __init__(self, full_weight: torch.Tensor, tp: TensorParallel) -> None:
        super().__init__(full_weight, tp, dim=0)


class RowParallelLinear(_ShardedLinear):
    """Takes an input split by columns; the partial products are summed by `reduce_from`."""

    def __init__(self, full_weight: torch.Tensor, tp: TensorParallel) -> None:
        super().__init__(full_weight, tp, dim=1)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from(super().forward(x), self.tp)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of the vocabulary; lookups are summed across ranks."""

    def __init__(self, full_weight: torch.Tensor, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(tp.shard(full_weight, dim=0))
        self.first = tp.rank * self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(tokens, self.weight)
        local = tokens - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from(out.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of logits split by vocabulary, without gathering them."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
        logits = logits.float()
        peak = tp.all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)
        shifted = logits - peak.unsqueeze(-1)
        first = tp.rank * logits.shape[-1]
        local = targets - first
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = tp.all_reduce(target_logit)
        exp = shifted.exp()
        total = tp.all_reduce(exp.sum(dim=-1))
        softmax = exp / total.unsqueeze(-1)
        ctx.save_for_backward(softmax, local, outside)
        return total.log() - target_logit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        onehot = torch.zeros_like(grad_logits).scatter_(-1, local.unsqueeze(-1), 1.0)
        grad_logits -= onehot * (~outside).unsqueeze(-1)
        return grad_logits * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Mean cross entropy over all tokens; `logits` hold this rank's vocabulary range."""
    if tp.size == 1:
        return nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())
    return _VocabParallelCrossEntropy.apply(logits, targets, tp).mean()

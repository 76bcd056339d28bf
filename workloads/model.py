"""A small Llama-style transformer whose pipeline stages and tensor-parallel shards are cut from one model.

Every weight is drawn from its own seeded generator at full size and then
sliced, so a rank of any DP x TP x PP layout holds exactly the numbers the
single-process model holds at the same place: the layouts can be compared
loss for loss. The block is the one `trace.ModelShape` counts: grouped-query
attention without biases, a SwiGLU MLP, two RMSNorms; the embedding and the
output layer are untied. There is no positional encoding: the causal mask
alone tells positions apart, which is enough for the synthetic task.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from dynamiccl.workloads.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    copy_to,
    vocab_parallel_cross_entropy,
)
from dynamiccl.workloads.trace import ModelShape


@dataclass(frozen=True)
class GPTConfig(ModelShape):
    """The model's dimensions (as the collective trace counts them), its sequence length and seed."""

    seq_len: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide into heads, and heads into kv_heads groups")

    def check_split(self, tp: int, pp: int) -> None:
        for name in ("heads", "kv_heads", "ffn_hidden", "vocab"):
            if getattr(self, name) % tp:
                raise ValueError(f"{name}={getattr(self, name)} does not split over tp={tp}")
        if self.layers % pp:
            raise ValueError(f"{self.layers} layers do not split into {pp} pipeline stages")


def _weight(config: GPTConfig, *path: int | str, shape: tuple[int, ...]) -> torch.Tensor:
    """The full-size initial value of one weight, the same on every rank of every layout."""
    generator = torch.Generator().manual_seed(zlib.crc32(repr((config.seed, *path)).encode()))
    return torch.randn(shape, generator=generator) * 0.02


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.head_dim = config.hidden // config.heads
        self.heads = config.heads // tp.size
        self.kv_heads = config.kv_heads // tp.size
        h, kv = config.hidden, config.kv_heads * self.head_dim
        self.q = ColumnParallelLinear(_weight(config, layer, 0, shape=(h, h)), tp)
        self.k = ColumnParallelLinear(_weight(config, layer, 1, shape=(kv, h)), tp)
        self.v = ColumnParallelLinear(_weight(config, layer, 2, shape=(kv, h)), tp)
        self.out = RowParallelLinear(_weight(config, layer, 3, shape=(h, h)), tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to(x, self.tp)  # under sequence parallelism: gathers the whole sequence
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        h, f = config.hidden, config.ffn_hidden
        self.gate = ColumnParallelLinear(_weight(config, layer, 4, shape=(f, h)), tp)
        self.up = ColumnParallelLinear(_weight(config, layer, 5, shape=(f, h)), tp)
        self.down = RowParallelLinear(_weight(config, layer, 6, shape=(h, f)), tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to(x, self.tp)
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden)
        self.attention = Attention(config, layer, tp)
        self.mlp_norm = RMSNorm(config.hidden)
        self.mlp = SwiGLU(config, layer, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Stage(nn.Module):
    """Pipeline stage `index` of `count`: the first embeds tokens, the last returns the loss.

    forward(x, targets) takes token ids (first stage) or the previous
    stage's activations, and returns activations, or the mean loss on the
    last stage (where `targets` is required).
    """

    def __init__(self, config: GPTConfig, index: int = 0, count: int = 1,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        config.check_split(tp.size, count)
        self.tp = tp
        self.first, self.last = index == 0, index == count - 1
        per_stage = config.layers // count
        layers = range(index * per_stage, (index + 1) * per_stage)
        if self.first:
            self.embedding = VocabParallelEmbedding(
                _weight(config, "embedding", shape=(config.vocab, config.hidden)), tp)
        self.blocks = nn.ModuleList(Block(config, layer, tp) for layer in layers)
        if self.last:
            self.norm = RMSNorm(config.hidden)
            self.output = ColumnParallelLinear(_weight(config, "output", shape=(config.vocab, config.hidden)), tp)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.first:
            x = self.embedding(x)
        for block in self.blocks:
            x = block(x)
        if not self.last:
            return x
        if targets is None:
            raise ValueError("the last stage needs the targets to compute the loss")
        logits = self.output(copy_to(self.norm(x), self.tp))
        return vocab_parallel_cross_entropy(logits, targets, self.tp)

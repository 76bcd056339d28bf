"""Train the small transformer under a DP x TP x PP layout: the traffic DynamICCL tunes.

    torchrun --nproc-per-node 8 -m dynamiccl.workloads.train --tp 2 --pp 2 --dp 2 --steps 20

gloo on CPU, NCCL when CUDA is there. Data parallelism is PyTorch's
DistributedDataParallel when there is one pipeline stage, or with `--fsdp`
FSDP2 (`fully_shard` of each transformer block and of the stage over the
data-parallel group: parameters all-gathered per block, gradients
reduce-scattered); with several stages, each
stage's gradients are all-reduced after the pipeline flush from one flat
buffer cut into `--bucket-mb` buckets (as Megatron does: DDP cannot follow
gradients that several micro-batches' backward passes accumulate out of
order). Tensor parallelism is Megatron-style layers on plain collectives, or
with `--dtensor` PyTorch's DTensor (`parallelize_module`, workloads/dtensor.py).
The task is synthetic: each token follows from the one before, so a model that
learns shows a loss falling from ln(vocab) towards zero.

`--out DIR` writes one JSON file a rank: its coordinates, the step losses
(last stage), and with `--profile` the collectives it issued, as the
DynamICCL hook recorded them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import typer
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from dynamiccl.workloads.dtensor import parallelize_blocks
from dynamiccl.workloads.model import GPTConfig, RMSNorm, Stage
from dynamiccl.workloads.parallel import TensorParallel
from dynamiccl.workloads.pipeline import PipelineStage, Schedule
from dynamiccl.workloads.topology import Groups, build_groups, destroy_groups
from dynamiccl.workloads.trace import Layout

_NEVER = 1e6  # seconds: a profiling-only hook window that never elapses during a run
_MULTIPLIER, _INCREMENT = 5, 3  # next token = (5 * token + 3) mod vocab: a bijection for even vocabularies


def synthetic_tokens(config: GPTConfig, step: int, rows: int) -> torch.Tensor:
    """`rows` sequences of seq_len + 1 tokens for `step`, the same on every rank."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    tokens = torch.empty(rows, config.seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(config.vocab, (rows,), generator=generator)
    for t in range(config.seq_len):
        tokens[:, t + 1] = (_MULTIPLIER * tokens[:, t] + _INCREMENT) % config.vocab
    return tokens


def _reduce_flat(grads: list[torch.Tensor], reduce: Callable[[torch.Tensor], None]) -> None:
    """Run `reduce` in place on the gradients laid end to end in one buffer, then copy them back."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    reduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def all_reduce_gradients(module: torch.nn.Module, group: object, bucket_bytes: int) -> None:
    """Average gradients over the data-parallel group, bucket by bucket from one flat buffer."""
    def average(flat: torch.Tensor) -> None:
        for bucket in flat.split(max(1, bucket_bytes // flat.element_size())):
            dist.all_reduce(bucket, group=group)
        flat /= dist.get_world_size(group)

    _reduce_flat([p.grad for p in module.parameters() if p.grad is not None], average)


def sum_norm_gradients(stage: Stage, tp: TensorParallel) -> None:
    """Under sequence parallelism each tensor-parallel rank's norms saw only its part of the
    sequence: sum their gradients over the group, in one all-reduce a step (as Megatron does)."""
    _reduce_flat([p.grad for module in stage.modules() if isinstance(module, RMSNorm)
                  for p in module.parameters() if p.grad is not None], tp.all_reduce)


class Trainer:
    """One rank's model shard, optimizer and step."""

    def __init__(self, config: GPTConfig, layout: Layout, groups: Groups, device: torch.device,
                 schedule: Schedule = Schedule.one_f_one_b, lr: float = 3e-3) -> None:
        self.config, self.layout, self.groups, self.device = config, layout, groups, device
        self.schedule = schedule
        if layout.dtensor:  # built whole, then split by DTensor over the tensor-parallel group
            self.stage = Stage(config, groups.where.pp, layout.pp).to(device)
            if groups.tp.group is not None:
                parallelize_blocks(self.stage, DeviceMesh.from_group(groups.tp.group, device.type))
        else:
            self.stage = Stage(config, groups.where.pp, layout.pp, groups.tp).to(device)
        self.model: torch.nn.Module = self.stage
        if layout.fsdp and groups.dp is not None:
            mesh = DeviceMesh.from_group(groups.dp, device.type)
            for block in self.stage.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.stage, mesh=mesh)
        elif layout.pp == 1 and groups.dp is not None:
            self.model = DistributedDataParallel(self.stage, process_group=groups.dp,
                                                 bucket_cap_mb=layout.bucket_bytes / 2**20)
        self.pipeline = None
        if layout.pp > 1:
            sequence = config.seq_len // layout.tp if groups.tp.splits_sequence else config.seq_len
            shape = (layout.micro_batch_size, sequence, config.hidden)
            self.pipeline = PipelineStage(self.stage, layout.pp - 1 - groups.where.pp, groups.previous,
                                          groups.next, shape, device)
        self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=lr, weight_decay=0.0)

    def step(self, step: int) -> float | None:
        """One optimizer step on this rank's share of the global batch; the mean loss on the last stage."""
        layout = self.layout
        rows = layout.micro_batches * layout.micro_batch_size
        tokens = synthetic_tokens(self.config, step, rows * layout.dp)
        mine = tokens[self.groups.where.dp * rows:(self.groups.where.dp + 1) * rows].to(self.device)
        inputs = list(mine[:, :-1].split(layout.micro_batch_size))
        targets = list(mine[:, 1:].split(layout.micro_batch_size))
        self.optimizer.zero_grad(set_to_none=True)
        if self.pipeline is not None:
            losses = self.pipeline.run(self.schedule, inputs, targets)
            if self.groups.dp is not None:
                all_reduce_gradients(self.stage, self.groups.dp, layout.bucket_bytes)
        else:
            losses = self._accumulate(inputs, targets)
        if self.groups.tp.splits_sequence:
            sum_norm_gradients(self.stage, self.groups.tp)
        self.optimizer.step()
        return sum(losses) / len(losses) if losses else None

    def _accumulate(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
        losses = []
        for m, (x, y) in enumerate(zip(inputs, targets)):
            last = m == len(inputs) - 1
            if isinstance(self.model, FSDPModule):  # gradients reduce-scattered after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            sync = self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last \
                else nullcontext()
            with sync:
                loss = self.model(x, y)
                (loss / len(inputs)).backward()
            losses.append(float(loss.detach()))
        return losses


def recorded_calls() -> list[dict[str, int | str]]:
    """What the hook recorded so far, one row per kind of call (collective, bytes, ranks, nodes)."""
    from dynamiccl.agent import hook

    profiler = hook.current()
    if profiler is None:
        return []
    calls: Counter[tuple[str, int, int, int]] = Counter()
    for cell in profiler.table.take().items():
        key, (count, _seconds) = cell
        calls[(key.collective.value, key.nbytes, key.nranks, key.nnodes)] += int(count)
    return [dict(collective=c, nbytes=b, nranks=r, nnodes=n, calls=k) for (c, b, r, n), k in sorted(calls.items())]


def _train(trainer: Trainer, steps: int, out: Path | None, profile: bool) -> None:
    losses = []
    for step in range(steps):
        loss = trainer.step(step)
        if loss is not None:
            losses.append(loss)
            if trainer.groups.where.tp == 0 and trainer.groups.where.dp == 0:
                print(f"step {step:4d}  loss {loss:.4f}", flush=True)
    if out is not None:
        where = trainer.groups.where
        result = dict(rank=trainer.groups.rank, tp=where.tp, dp=where.dp, pp=where.pp, losses=losses,
                      steps=steps, calls=recorded_calls() if profile else None)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.groups.rank}.json").write_text(json.dumps(result))

def main(
    tp: int = typer.Option(1, min=1, help="tensor-parallel degree"),
    pp: int = typer.Option(1, min=1, help="pipeline stages"),
    dp: int = typer.Option(1, min=1, help="data-parallel replicas"),
    layers: int = typer.Option(4, min=1),
    hidden: int = typer.Option(64, min=1),
    heads: int = typer.Option(4, min=1),
    kv_heads: int = typer.Option(2, min=1),
    ffn_hidden: int = typer.Option(256, min=1),
    vocab: int = typer.Option(256, min=2),
    seq_len: int = typer.Option(32, min=1),
    micro_batches: int = typer.Option(4, min=1),
    micro_batch_size: int = typer.Option(2, min=1),
    steps: int = typer.Option(10, min=1),
    schedule: Schedule = typer.Option(Schedule.one_f_one_b, help="pipeline schedule"),
    lr: float = typer.Option(3e-3, min=0.0),
    bucket_mb: float = typer.Option(25.0, min=0.001, help="gradient all-reduce bucket size (MiB)"),
    sequence_parallel: bool = typer.Option(False, help="split activations along the sequence between "
                                                       "tensor-parallel layers (all-gather / reduce-scatter)"),
    fsdp: bool = typer.Option(False, help="data parallelism by FSDP2 (fully_shard) instead of DDP; one "
                                          "pipeline stage, no sequence parallelism"),
    dtensor: bool = typer.Option(False, help="tensor parallelism by DTensor (parallelize_module with "
                                             "ColwiseParallel / RowwiseParallel) instead of the Megatron-style "
                                             "layers; one pipeline stage and data-parallel replica"),
    seed: int = typer.Option(0),
    profile: bool = typer.Option(False, help="record the collectives issued (written with --out)"),
    out: Path | None = typer.Option(None, help="directory for one JSON result file per rank"),
) -> None:
    """Train under torchrun; the last stage's first rank prints the loss of each step."""
    config = GPTConfig(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn_hidden=ffn_hidden,
                       vocab=vocab, seq_len=seq_len, seed=seed)
    config.check_split(tp, pp)
    if sequence_parallel and seq_len % tp:
        raise typer.BadParameter(f"a sequence of {seq_len} does not split over tp={tp}", param_hint="--seq-len")
    if fsdp and (pp > 1 or sequence_parallel):
        raise typer.BadParameter("FSDP2 here shards one pipeline stage without sequence parallelism: "
                                 "use --pp 1 and no --sequence-parallel", param_hint="--fsdp")
    if dtensor and (pp > 1 or dp > 1 or sequence_parallel):
        raise typer.BadParameter("DTensor tensor parallelism here runs alone: use --pp 1 --dp 1 and no "
                                 "--sequence-parallel", param_hint="--dtensor")
    layout = Layout(tp=tp, pp=pp, dp=dp, micro_batches=micro_batches, micro_batch_size=micro_batch_size,
                    seq_len=seq_len, dtype_bytes=4, grad_bytes=4, bucket_bytes=int(bucket_mb * 2**20),
                    sequence_parallel=sequence_parallel, fsdp=fsdp, dtensor=dtensor,
                    gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", tp * pp * dp)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    if profile:
        from dynamiccl.agent import hook

        hook.install(window_s=_NEVER)  # keep every call in this process for --out
    try:
        _train(Trainer(config, layout, build_groups(layout), device, schedule, lr), steps, out, profile)
    finally:
        if profile:
            hook.uninstall(flush=False)
        destroy_groups()  # the trainer (and DDP's reducer) is gone by now, the groups still exist

if __name__ == "__main__":
    typer.run(main)

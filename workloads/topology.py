"""Process groups of a DP x TP x PP layout (Megatron order: TP innermost, then DP, then PP)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dynamiccl.workloads.parallel import TensorParallel
from dynamiccl.workloads.trace import Layout


@dataclass(frozen=True)
class Coordinates:
    tp: int
    dp: int
    pp: int


def coordinates(layout: Layout, rank: int) -> Coordinates:
    return Coordinates(tp=rank % layout.tp, dp=(rank // layout.tp) % layout.dp,
                       pp=rank // (layout.tp * layout.dp))


@dataclass(frozen=True)
class Groups:
    """The groups one rank belongs to. Pipeline neighbours get a two-rank group per boundary, so a
    send or receive is a 2-rank, point-to-point call (what the collective trace counts)."""

    rank: int
    where: Coordinates
    tp: TensorParallel
    dp: Any  # ProcessGroup of this rank's data-parallel replicas, None when dp == 1
    previous: tuple[int, Any] | None  # (global rank, 2-rank group) of the stage before
    next: tuple[int, Any] | None  # (global rank, 2-rank group) of the stage after


def build_groups(layout: Layout) -> Groups:
    """Create every group of the layout (all ranks must call this, in the same order)."""
    rank = dist.get_rank()
    if dist.get_world_size() != layout.world:
        raise ValueError(f"the layout needs {layout.world} ranks (tp x dp x pp), "
                         f"the job has {dist.get_world_size()}")
    where = coordinates(layout, rank)
    tp = TensorParallel()
    dp = None
    for pp_index in range(layout.pp):
        for dp_index in range(layout.dp):
            members = [layout.rank(t, dp_index, pp_index) for t in range(layout.tp)]
            group = dist.new_group(members) if layout.tp > 1 else None
            if rank in members and group is not None:
                tp = TensorParallel(group=group, rank=where.tp, size=layout.tp,
                                    sequence_parallel=layout.sequence_parallel)
        for tp_index in range(layout.tp):
            members = [layout.rank(tp_index, d, pp_index) for d in range(layout.dp)]
            group = dist.new_group(members) if layout.dp > 1 else None
            if rank in members:
                dp = group
    previous = following = None
    for pp_index in range(layout.pp - 1):
        for dp_index in range(layout.dp):
            for tp_index in range(layout.tp):
                low = layout.rank(tp_index, dp_index, pp_index)
                high = layout.rank(tp_index, dp_index, pp_index + 1)
                group = dist.new_group([low, high])
                if rank == low:
                    following = (high, group)
                elif rank == high:
                    previous = (low, group)
    return Groups(rank=rank, where=where, tp=tp, dp=dp, previous=previous, next=following)


#: Seconds for gloo's worker threads to go idle before the groups are destroyed.
DRAIN_S = 0.5


def destroy_groups() -> None:
    """Destroy every process group once gloo's worker threads are idle. They dispose of finished
    collectives after their callers moved on, which needs the GIL: a group destroyed meanwhile
    can hang the process at exit, or abort it ("terminate called without an active exception",
    2 of 12 runs of a 3-step DDP script on torch 2.13, none with the pause)."""
    time.sleep(DRAIN_S)
    dist.destroy_process_group()

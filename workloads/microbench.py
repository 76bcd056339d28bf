"""nccl-tests-style sweep of one collective over message sizes, on a real backend (gloo or NCCL).

    torchrun --nproc-per-node 2 -m dynamiccl.workloads.microbench --collective allreduce

Rank 0 prints one row a size: time (rank 0's mean between barriers), algorithm and
bus bandwidth, as nccl-tests computes them. Run under `dynamiccl launch`
(which `dynamiccl bench --backend gloo|nccl` does), the DynamICCL hook times
the same calls and the node agent reports them like any job's; NCCL runs
whatever configuration the environment forces (NCCL_ALGO / NCCL_PROTO).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import typer
from rich.console import Console
from rich.table import Table

from dynamiccl.nccl.cost_model import bus_bandwidth_gbs
from dynamiccl.schemas import Collective, Context
from dynamiccl.sweep import message_sizes
from dynamiccl.workloads.topology import destroy_groups

#: The collectives this sweep can issue, as the hook sizes them (`Context.nbytes`).
SUPPORTED = (Collective.allreduce, Collective.allgather, Collective.reducescatter, Collective.broadcast,
             Collective.reduce)


def _operation(collective: Collective, nbytes: int, world: int,
               device: torch.device) -> tuple[Callable[[], None], int]:
    """One call of `collective` on buffers made once, and the bytes it moves as NCCL counts them
    (`nbytes` rounded down to float32 elements divisible by the world size)."""
    elements = max(world, nbytes // 4 // world * world)
    if collective is Collective.allgather:
        output = torch.empty(elements, device=device)
        shard = torch.ones(elements // world, device=device)
        return (lambda: dist.all_gather_into_tensor(output, shard)), elements * 4
    if collective is Collective.reducescatter:
        full = torch.ones(elements, device=device)
        shard = torch.empty(elements // world, device=device)
        return (lambda: dist.reduce_scatter_tensor(shard, full)), elements * 4
    buffer = torch.ones(elements, device=device)
    if collective is Collective.allreduce:
        return (lambda: dist.all_reduce(buffer)), elements * 4
    if collective is Collective.broadcast:
        return (lambda: dist.broadcast(buffer, src=0)), elements * 4
    return (lambda: dist.reduce(buffer, dst=0)), elements * 4


def time_call(call: Callable[[], None], iterations: int, warmup: int, device: torch.device) -> float:
    """Mean seconds a call on this rank, between barriers (so every rank starts together and the
    last one's finish bounds the time); no extra collective that the hook would record."""
    for _ in range(warmup):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return (time.perf_counter() - start) / iterations


def main(
    collective: Collective = typer.Option(Collective.allreduce, case_sensitive=False),
    min_bytes: int = typer.Option(1024, min=4),
    max_bytes: int = typer.Option(16 << 20, min=4),
    step_factor: int = typer.Option(4, min=2),
    iterations: int = typer.Option(20, min=1),
    warmup: int = typer.Option(3, min=0),
) -> None:
    """Sweep sizes of one collective; rank 0 prints the table."""
    if collective not in SUPPORTED:
        raise typer.BadParameter(f"one of {', '.join(c.value for c in SUPPORTED)}", param_hint="--collective")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    nodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    table = Table(title=f"{collective.value} on {dist.get_backend()}: {world} ranks, {nodes} node(s)")
    for column in ("size", "time (us)", "algbw (GB/s)", "busbw (GB/s)"):
        table.add_column(column, justify="right")
    try:
        for nbytes in message_sizes(min_bytes, max_bytes, step_factor):
            call, moved = _operation(collective, nbytes, world, device)
            time_us = time_call(call, iterations, warmup, device) * 1e6
            context = Context(collective=collective, nbytes=moved, nranks=world, nnodes=nodes)
            table.add_row(f"{moved:,}", f"{time_us:.1f}", f"{moved / time_us / 1e3:.3f}",
                          f"{bus_bandwidth_gbs(context, time_us):.3f}")
    finally:
        destroy_groups()
    if rank == 0:
        Console().print(table)


if __name__ == "__main__":
    typer.run(main)

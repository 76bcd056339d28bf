"""Overhead of the torch hook on gloo (CPU): per-call cost and DDP step time.

    python benchmarks/hook_overhead.py [--calls 2000] [--reps 7] [--steps 20]

Two ranks on loopback (spawned processes). With and without the hook are
measured side by side in one run: blocks alternate (off, on, off, on, ...)
and each figure is the median over repetitions, so drift on a busy machine
hits both alike.
(a) µs added per 4 KB all_reduce, on the 2-rank group and on a 1-rank group
    (whose calls are short, so the hook's own cost is not lost in the
    2-rank call's jitter). Target <= 10 µs.
(b) step time of an unmodified DDP MLP, hook off vs on (its reducer's buckets are timed).
    Target <= 1%.
The hook posts to an address where no agent listens, once an hour: the
sender thread stays out of the way, as it does between windows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from dynamiccl.agent import hook
from dynamiccl.workloads.topology import destroy_groups

WORLD = 2
NO_AGENT = "http://127.0.0.1:9"  # discard port: nothing listens


def _per_call_us(calls: int, group: dist.ProcessGroup | None) -> tuple[float, float]:
    """(wall, CPU of the calling thread) µs per 4 KB all_reduce."""
    tensor = torch.ones(1024)
    dist.barrier()
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        dist.all_reduce(tensor, group=group)
    return (time.perf_counter() - start) / calls * 1e6, (time.thread_time() - cpu) / calls * 1e6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024), torch.nn.GELU(),
        torch.nn.Linear(1024, 256),
    )


def _step_ms(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    """(wall, CPU of the training thread) ms per step."""
    data = torch.randn(64, 256)
    dist.barrier()
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(data).square().mean().backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3, (time.thread_time() - cpu) / steps * 1e3


def _toggle(on: bool) -> None:
    if on:
        hook.install(agent_url=NO_AGENT, job_id="bench", window_s=3600.0)
    else:
        hook.uninstall(flush=False)


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    solo = [dist.new_group([r]) for r in range(WORLD)][rank]
    model = torch.nn.parallel.DistributedDataParallel(_model())  # unmodified: no comm hook
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    results: dict[str, dict[bool, list[tuple[float, float]]]] = {
        k: {False: [], True: []} for k in ("pair", "solo", "ddp")
    }
    for on in (False, True):  # warm-up
        _toggle(on)
        _per_call_us(200, None)
        _step_ms(model, optimizer, 3)
        _toggle(False)
    for _ in range(args.reps):
        for on in (False, True):
            _toggle(on)
            results["pair"][on].append(_per_call_us(args.calls, None))
            results["solo"][on].append(_per_call_us(args.calls, solo))
            results["ddp"][on].append(_step_ms(model, optimizer, args.steps))
            _toggle(False)
    if rank == 0:
        Path(out).write_text(json.dumps({k: {str(on): v for on, v in d.items()} for k, d in results.items()}))
    destroy_groups()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="all_reduce calls per block")
    parser.add_argument("--reps", type=int, default=7, help="alternating off/on repetitions")
    parser.add_argument("--steps", type=int, default=20, help="DDP steps per block")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.spawn(_worker, args=(_free_port(), args, out), nprocs=WORLD)
        raw = json.loads(Path(out).read_text())
    table = Table(title=f"DynamICCL hook overhead on gloo ({WORLD} ranks, loopback; median of {args.reps} "
                        f"alternating repetitions)")
    for column in ("measurement", "clock", "without hook", "with hook", "added", "target"):
        table.add_column(column, justify="left" if column in ("measurement", "clock") else "right")
    rows = (
        ("pair", f"4 KB all_reduce, {WORLD}-rank group (µs/call)", "µs", "<= 10 µs"),
        ("solo", "4 KB all_reduce, 1-rank group (µs/call)", "µs", "<= 10 µs"),
        ("ddp", "DDP MLP step, 1.6M params (ms/step)", "%", "<= 1%"),
    )
    for key, label, unit, target in rows:
        for index, clock in enumerate(("wall", "thread CPU")):
            off = statistics.median(sample[index] for sample in raw[key]["False"])
            on = statistics.median(sample[index] for sample in raw[key]["True"])
            added = f"{on - off:+.2f} µs" if unit == "µs" else f"{(on / off - 1) * 100:+.2f}%"
            table.add_row(label if index == 0 else "", clock, f"{off:.2f}", f"{on:.2f}", added, target)
    Console().print(table)
    Console().print("thread CPU: time the calling (training) thread spends on the CPU, the hook's own "
                    "cost; wall: includes waiting for the peer and every other process on the machine.")


if __name__ == "__main__":
    main()

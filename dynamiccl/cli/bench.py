"""`dynamiccl fabrics` and `dynamiccl bench`: the simulated presets, nccl-tests style."""

from __future__ import annotations

import math
import sys

import typer
from rich.console import Console
from rich.table import Table

from dynamiccl.nccl.cost_model import bus_bandwidth_gbs
from dynamiccl.schemas import Collective, Context, NcclConfig
from dynamiccl.sim import PRESETS, SimulatedFabric, get_preset

console = Console(width=None if sys.stdout.isatty() else 140)


def fabrics() -> None:
    """List the simulated fabric presets."""
    table = Table(title="Simulated fabric presets")
    for column in ("name", "GPUs", "intra-node", "inter-node", "NICs", "nodes", "description"):
        table.add_column(column)
    for preset in PRESETS.values():
        f = preset.fabric
        table.add_row(preset.name, f"{f.gpus_per_node}x {f.gpu}", f.intra_node, f.inter_node,
                      str(f.nics_per_node), str(preset.nodes), preset.description)
    console.print(table)


def _sizes(min_bytes: int, max_bytes: int, step_factor: int) -> list[int]:
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= step_factor
    return sizes


def bench(
    fabric: str | None = typer.Option(None, help="preset name (default: every preset)"),
    collective: Collective = typer.Option(Collective.allreduce, case_sensitive=False),
    oracle: bool = typer.Option(False, help="also show the best config and the headroom over NCCL's"),
    nnodes: int | None = typer.Option(None, min=1, help="communicator size in nodes (default: the preset's)"),
    min_bytes: int = typer.Option(1024, min=1),
    max_bytes: int = typer.Option(1 << 30, min=1),
    step_factor: int = typer.Option(4, min=2),
) -> None:
    """nccl-tests-like table of a simulated preset: what NCCL picks and, with --oracle, what it leaves.

    Times are the simulator's noiseless true latencies (no measurement noise)."""
    try:
        presets = [get_preset(fabric)] if fabric else list(PRESETS.values())
    except KeyError as error:
        raise typer.BadParameter(str(error), param_hint="--fabric") from None
    headrooms: list[float] = []
    for preset in presets:
        sim = SimulatedFabric(preset)
        for nodes in [nnodes] if nnodes else preset.node_counts:
            table = _table(preset.name, collective, nodes, preset.fabric.gpus_per_node, oracle)
            for size in _sizes(min_bytes, max_bytes, step_factor):
                context = Context(collective=collective, nbytes=size,
                                  nranks=nodes * preset.fabric.gpus_per_node, nnodes=nodes)
                time_us = sim.true_latency_us(context, NcclConfig())
                row = [_size(size), f"{time_us:.1f}", f"{size / time_us / 1e3:.2f}",
                       f"{bus_bandwidth_gbs(context, time_us):.2f}", sim.default_config(context).label()]
                if oracle:
                    best, best_us = sim.oracle(context)
                    headrooms.append(time_us / best_us)
                    row += [sim.nccl.resolve(context, best).label(), f"{bus_bandwidth_gbs(context, best_us):.2f}",
                            f"{time_us / best_us:.3f}"]
                table.add_row(*row)
            console.print(table)
    if headrooms:
        geo = math.exp(sum(map(math.log, headrooms)) / len(headrooms))
        console.print(f"geometric-mean headroom over NCCL's default: {geo:.3f}x "
                      f"(max {max(headrooms):.3f}x over {len(headrooms)} sizes)")


def _table(name: str, collective: Collective, nodes: int, gpus: int, oracle: bool) -> Table:
    table = Table(title=f"{name}: {collective.value}, {nodes} node(s) x {gpus} GPUs (simulated, noiseless)")
    for column in ("size", "time (us)", "algbw (GB/s)", "busbw (GB/s)", "NCCL picks"):
        table.add_column(column, justify="right")
    if oracle:
        for column in ("best config", "best busbw", "headroom"):
            table.add_column(column, justify="right")
    return table


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:g} {unit}"
        nbytes //= 1024
    return str(nbytes)

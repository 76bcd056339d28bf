"""`dynamiccl fabrics` and `dynamiccl bench`: the simulated presets, nccl-tests style."""

from __future__ import annotations

import math
import os
import sys
from enum import StrEnum

import typer
from rich.console import Console
from rich.table import Table

from dynamiccl.nccl.cost_model import bus_bandwidth_gbs
from dynamiccl.nccl.env import EnvSetting, render_env
from dynamiccl.nccl.space import InvalidConfig
from dynamiccl.sweep import message_sizes
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


class Backend(StrEnum):
    sim = "sim"
    gloo = "gloo"
    nccl = "nccl"


def bench(
    backend: Backend = typer.Option(Backend.sim, case_sensitive=False,
                                    help="sim: a simulated preset | gloo, nccl: this machine, under torchrun"),
    fabric: str | None = typer.Option(None, help="preset name (sim; default: every preset)"),
    collective: Collective = typer.Option(Collective.allreduce, case_sensitive=False),
    oracle: bool = typer.Option(False, help="sim: also show the best config and the headroom over NCCL's"),
    nnodes: int | None = typer.Option(None, min=1, help="sim: communicator size in nodes (default: the preset's)"),
    nranks: int = typer.Option(2, min=1, help="gloo, nccl: ranks on this machine"),
    config: list[str] = typer.Option([], help="nccl: run the sweep once per config ALGO/PROTO\\[/CHANNELS] "
                                              "(repeatable; default: what the agent recommends)"),
    iterations: int = typer.Option(20, min=1, help="gloo, nccl: timed calls per size"),
    agent_url: str | None = typer.Option(None, "--agent", envvar="DYNAMICCL_AGENT_URL",
                                         help="gloo, nccl: node agent that reports the timings"),
    job: str | None = typer.Option(None, help="gloo, nccl: job id the measurements are reported under"),
    min_bytes: int = typer.Option(1024, min=1),
    max_bytes: int = typer.Option(1 << 30, min=1),
    step_factor: int = typer.Option(4, min=2),
) -> None:
    """nccl-tests-like sweep over sizes, on a simulated preset or on this machine's gloo or NCCL.

    sim: NCCL's pick per size (noiseless model); --oracle adds the best config and the headroom.

    gloo, nccl: timed under torchrun, reported through the node agent like any job's."""
    if backend is Backend.sim:
        _bench_simulated(fabric, collective, oracle, nnodes, min_bytes, max_bytes, step_factor)
        return
    if backend is Backend.gloo and config:
        raise typer.BadParameter("gloo has no NCCL configuration to choose", param_hint="--config")
    settings = [_config_env(text, collective) for text in config] or [{}]
    for env in settings:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nranks}",
                   "-m", "dynamiccl.workloads.microbench", f"--collective={collective.value}",
                   f"--min-bytes={min_bytes}", f"--max-bytes={max_bytes}", f"--step-factor={step_factor}",
                   f"--iterations={iterations}"]
        status = _launch(command, env, backend, job, agent_url)
        if status:
            raise typer.Exit(status)


def parse_config(text: str) -> NcclConfig:
    """`ALGO/PROTO[/CHANNELS]` as a config (typer.BadParameter naming what is wrong)."""
    parts = text.split("/")
    try:
        if len(parts) not in (2, 3):
            raise ValueError("expected ALGO/PROTO or ALGO/PROTO/CHANNELS")
        return NcclConfig(algo=parts[0], proto=parts[1], nchannels=int(parts[2]) if len(parts) == 3 else None)
    except ValueError as error:
        raise typer.BadParameter(f"{text!r}: {error}", param_hint="--config") from None


def _config_env(text: str, collective: Collective) -> dict[str, str]:
    """NCCL variables forcing ALGO/PROTO[/CHANNELS] on `collective`."""
    chosen = parse_config(text)
    try:
        return render_env(EnvSetting(algos={collective: chosen.algo}, protos={collective: chosen.proto},
                                     nchannels=chosen.nchannels))
    except InvalidConfig as error:
        raise typer.BadParameter(f"{text!r}: {error}", param_hint="--config") from None


def _launch(command: list[str], env: dict[str, str], backend: Backend, job: str | None,
            agent_url: str | None) -> int:
    from dynamiccl.agent.launch.launcher import Mode, launch

    environ = {**os.environ, **env}
    if backend is Backend.gloo:
        environ["CUDA_VISIBLE_DEVICES"] = ""  # the microbenchmark picks NCCL whenever it sees a GPU
    return launch(command, job=job, agent_url=agent_url, mode=Mode.env, environ=environ)


def _bench_simulated(fabric: str | None, collective: Collective, oracle: bool, nnodes: int | None,
                     min_bytes: int, max_bytes: int, step_factor: int) -> None:
    try:
        presets = [get_preset(fabric)] if fabric else list(PRESETS.values())
    except KeyError as error:
        raise typer.BadParameter(str(error), param_hint="--fabric") from None
    headrooms: list[float] = []
    for preset in presets:
        sim = SimulatedFabric(preset)
        for nodes in [nnodes] if nnodes else preset.node_counts:
            table = _table(preset.name, collective, nodes, preset.fabric.gpus_per_node, oracle)
            for size in message_sizes(min_bytes, max_bytes, step_factor):
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

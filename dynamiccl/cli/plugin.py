"""`dynamiccl plugin`: DynamICCL's NCCL tuner plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(name="plugin", help="DynamICCL's NCCL tuner plugin (per-size rules that change inside a job).",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def plugin() -> None:
    """DynamICCL's NCCL tuner plugin."""


@app.command()
def build(force: bool = typer.Option(False, "--force", help="compile even if this source was built already")) -> None:
    """Compile the plugin into ~/.cache/dynamiccl/plugin (once per source version) and print its path."""
    from dynamiccl.agent.plugin.build import PluginBuildError
    from dynamiccl.agent.plugin.build import build as build_plugin

    console = Console(stderr=True, soft_wrap=True)
    try:
        built = build_plugin(force=force)
    except PluginBuildError as error:
        console.print(f"dynamiccl plugin build: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{'compiled with ' + built.compiler if built.compiled else 'up to date'}; "
                  f"load it with NCCL_TUNER_PLUGIN={built.path}", markup=False, highlight=False)
    print(built.path)


def _size_range(size_log2: int) -> str:
    def human(n: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024:
                return f"{n} {unit}"
            n //= 1024
        return f"{n} PiB"

    return f"{human(1 << size_log2 if size_log2 else 0)} to <{human(1 << (size_log2 + 1))}"


@app.command()
def check(rules_file: Annotated[Path, typer.Argument(help="a rules file in the format of NCCL's example tuner "
                                                           "plugin (or DynamICCL's sectioned one)")]) -> None:
    """Read RULES_FILE through the plugin itself and print each rule as it understood it, or each line it
    refuses and why. Exits 1 if any line is refused or the file cannot be used."""
    from dynamiccl.agent.plugin.build import PluginBuildError
    from dynamiccl.agent.plugin.build import build as build_plugin
    from dynamiccl.agent.plugin.check import check_rules_file

    errors = Console(stderr=True, soft_wrap=True)
    try:
        library = build_plugin().path
    except PluginBuildError as error:
        errors.print(f"dynamiccl plugin check: {error}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    result = check_rules_file(rules_file, library)
    for warning in result.warnings:
        errors.print(f"{rules_file}: {warning}", markup=False, highlight=False)
    table = Table(title=f"{rules_file}: {sum(line.accepted for line in result.lines)} rules read, "
                        f"{sum(not line.accepted for line in result.lines)} lines refused", title_justify="left")
    for column in ("line", "read as", "rule, or why the line is refused"):
        table.add_column(column)
    for line in result.lines:
        table.add_row(str(line.line_no), "rule" if line.accepted else "[red]refused[/red]", line.reading)
    Console(soft_wrap=True).print(table)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def show(rules_file: Annotated[Path, typer.Argument(help="the rules file NCCL_TUNER_CONFIG_FILE names")]) -> None:
    """Print what the plugin chose per communicator and size class, from its reports next to RULES_FILE."""
    from dynamiccl.agent.plugin.report import read_reports

    console = Console(soft_wrap=True)
    reports = read_reports(rules_file)
    if not reports:
        Console(stderr=True, soft_wrap=True).print(f"no reports next to {rules_file} (the plugin writes "
                                   f"{rules_file.name}.chosen.<pid>.json unless DYNAMICCL_TUNER_REPORT_MS=-1)",
                                   markup=False, highlight=False)
        raise typer.Exit(1)
    for report in reports:
        for comm in report.comms:
            title = (f"pid {report.pid}, communicator {comm.comm_id or comm.ctx} ({comm.nranks} ranks, "
                     f"{comm.nnodes} nodes): {comm.calls} calls, rules version "
                     f"{'none' if comm.version is None else comm.version}, {comm.late} late switches"
                     f"{', finalized' if comm.finalized else ''}")
            table = Table(title=title, title_justify="left")
            for column in ("collective", "bytes", "decided by", "algo", "proto", "channels", "version", "calls"):
                table.add_column(column)
            for choice in comm.choices:
                table.add_row(choice.collective.value, _size_range(choice.size_log2),
                              "rule" if choice.source == "rule" else "NCCL (its cost model's pick)",
                              choice.algo.value if choice.algo else "-", choice.proto.value if choice.proto else "-",
                              str(choice.nchannels) if choice.nchannels else "NCCL's",
                              "-" if choice.version is None else str(choice.version), str(choice.calls))
            console.print(table)

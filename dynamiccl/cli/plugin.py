"""`dynamiccl plugin`: DynamICCL's NCCL tuner plugin."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(name="plugin", help="DynamICCL's NCCL tuner plugin (per-size rules that change inside a job).",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def plugin() -> None:
    """DynamICCL's NCCL tuner plugin."""


@app.command()
def build(force: bool = typer.Option(False, "--force", help="compile even if this source was built already")) -> None:
    """Compile the plugin into ~/.cache/dynamiccl/plugin (once per source version) and print its path."""
    from dynamiccl.agent.tuner_plugin.build import PluginBuildError
    from dynamiccl.agent.tuner_plugin.build import build as build_plugin

    console = Console(stderr=True, soft_wrap=True)
    try:
        built = build_plugin(force=force)
    except PluginBuildError as error:
        console.print(f"dynamiccl plugin build: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print(f"{'compiled with ' + built.compiler if built.compiled else 'up to date'}; "
                  f"load it with NCCL_TUNER_PLUGIN={built.path}", markup=False, highlight=False)
    print(built.path)

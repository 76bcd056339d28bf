"""The `dynamiccl` command line."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="dynamiccl",
    help="DynamICCL: learns which NCCL configuration is fastest on your fabric, and applies it.",
    no_args_is_help=True,
    add_completion=False,
)


if __name__ == "__main__":
    app()

"""The `dynamiccl` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from dynamiccl.cli import bench

app = typer.Typer(
    name="dynamiccl",
    help="DynamICCL: learns which NCCL configuration is fastest on your fabric, and applies it.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("fabrics")(bench.fabrics)
app.command("bench")(bench.bench)


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    database: str | None = typer.Option(
        None, envvar="DYNAMICCL_DATABASE_URL", help="SQLAlchemy URL (default: sqlite:///dynamiccl.db)"
    ),
    tokens_file: Path | None = typer.Option(
        None, exists=True, dir_okay=False, help="bearer tokens, one per line (optionally name:token)"
    ),
) -> None:
    """Run the tuning server."""
    from dynamiccl.server.cli import run_server

    run_server(host=host, port=port, database=database, tokens_file=tokens_file)


if __name__ == "__main__":
    app()

"""`dynamiccl import`: measurements platform teams already have, posted to a tuning server."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dynamiccl.cli.bench import parse_config
from dynamiccl.client import ApiError, DynamicclClient
from dynamiccl.nccl.nccl_csv import NcclCsvFormatError, parse_nccl_csv
from dynamiccl.nccl.nccl_tests import NcclTestsFormatError, parse_nccl_tests
from dynamiccl.schemas import MAX_BATCH_MEASUREMENTS, Collective, Measurement

app = typer.Typer(name="import", help="Post existing measurements (nccl-tests output, optimize_config.py CSV) "
                                      "to a tuning server.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def importer() -> None:
    """Post existing measurements to a tuning server."""


def post(client: DynamicclClient, fabric_id: str, source_text: str, measurements: Sequence[Measurement]) -> int:
    """Post in batches named by the source's content, so importing it again stores nothing twice;
    how many measurements were stored."""
    digest = hashlib.blake2b(f"{fabric_id}|{source_text}".encode(), digest_size=12).hexdigest()
    stored = 0
    for start in range(0, len(measurements), MAX_BATCH_MEASUREMENTS):
        chunk = measurements[start:start + MAX_BATCH_MEASUREMENTS]
        stored += client.post_measurements(fabric_id, f"import-{digest}-{start}", chunk).accepted
    return stored


def _stored(count: int) -> str:
    return f"{count} (0: already imported)" if count == 0 else str(count)


@app.command("nccl-tests")
def nccl_tests(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="nccl-tests output files")],
    fabric_id: str = typer.Option(..., "--fabric-id", help="the registered fabric the runs are from"),
    server: str = typer.Option(..., envvar="DYNAMICCL_SERVER", help="URL of the tuning server"),
    token: str | None = typer.Option(None, envvar="DYNAMICCL_TOKEN", help="bearer token (scope agent)"),
    config: str | None = typer.Option(None, help="ALGO/PROTO or ALGO/PROTO/CHANNELS the runs forced (default: from NCCL's "
                                                 "log lines in the file, else NCCL's default)"),
    collective: Collective | None = typer.Option(None, help="for output without its '# Collective test "
                                                           "starting' line"),
) -> None:
    """Read nccl-tests output (all_reduce_perf, all_gather_perf, reduce_scatter_perf, ...) and post each
    row's in- and out-of-place times as measurements (source bench). Importing a file again stores
    nothing twice: its batches are named by its content."""
    forced = parse_config(config) if config else None
    console, errors = Console(), Console(stderr=True, soft_wrap=True)
    table = Table(title=f"imported into {fabric_id}", title_justify="left")
    for column in ("file", "program", "ranks", "nodes", "config", "measurements", "dropped (#wrong)", "stored"):
        table.add_column(column)
    failed = False
    with DynamicclClient(server, token) as client:
        for path in files:
            text = path.read_text(errors="replace")
            try:
                run = parse_nccl_tests(text, collective=collective, config=forced, job_id=f"nccl-tests:{path.stem}"[:128])
            except NcclTestsFormatError as error:
                errors.print(f"{path}: {error}", markup=False, highlight=False)
                failed = True
                continue
            try:
                stored = post(client, fabric_id, f"{run.config.label()}|{text}", run.measurements)
            except ApiError as error:
                errors.print(f"{path}: the server refused it: {error}", markup=False, highlight=False)
                failed = True
                continue
            table.add_row(str(path), run.program, str(run.nranks), str(run.nnodes), run.config.label(),
                          str(len(run.measurements)), str(run.dropped), _stored(stored))
    console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command("nccl-csv")
def nccl_csv(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="the CSV optimize_config.py reads")],
    fabric_id: str = typer.Option(..., "--fabric-id", help="the registered fabric the rows are from"),
    server: str = typer.Option(..., envvar="DYNAMICCL_SERVER", help="URL of the tuning server"),
    token: str | None = typer.Option(None, envvar="DYNAMICCL_TOKEN", help="bearer token (scope agent)"),
) -> None:
    """Read the measurement CSV of NCCL's example tuner (optimize_config.py's input) and post its rows as
    measurements (source bench); rows it cannot be are listed with the reason. Exits 1 if any is."""
    errors = Console(stderr=True, soft_wrap=True)
    text = file.read_text(errors="replace")
    try:
        measurements, refused = parse_nccl_csv(text, job_id=f"nccl-csv:{file.stem}"[:128])
    except NcclCsvFormatError as error:
        errors.print(f"{file}: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    for row in refused:
        errors.print(f"{file}:{row.line}: {row.reason}", markup=False, highlight=False)
    stored = 0
    if measurements:
        with DynamicclClient(server, token) as client:
            try:
                stored = post(client, fabric_id, text, measurements)
            except ApiError as error:
                errors.print(f"{file}: the server refused it: {error}", markup=False, highlight=False)
                raise typer.Exit(1) from None
    Console(soft_wrap=True).print(f"{file}: {len(measurements)} rows read, {len(refused)} refused, {_stored(stored)} stored "
                    f"into {fabric_id}", markup=False, highlight=False)
    if refused:
        raise typer.Exit(1)

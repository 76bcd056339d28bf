"""`dynamiccl import nccl-tests`: files read, rows posted as bench measurements, re-imports idempotent."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from dynamiccl.cli.main import app

SAMPLE = Path(__file__).parents[1] / "nccl" / "data" / "all_reduce_perf_2x8.txt"


def test_rows_are_posted_once_however_often_a_file_is_imported(recording_server, tmp_path: Path) -> None:
    seen: set[str] = set()

    def answer(path: str, body: dict) -> tuple[int, dict]:
        duplicate = body["batch_id"] in seen
        seen.add(body["batch_id"])
        return 202, {"accepted": 0 if duplicate else len(body["measurements"]), "duplicate_batch": duplicate}

    server = recording_server(answer)
    args = ["import", "nccl-tests", str(SAMPLE), "--fabric-id", "dgx-h100-a", "--server", server.url]
    first = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    (body,) = server.posted("/v1/measurements")
    assert body["fabric_id"] == "dgx-h100-a" and len(body["measurements"]) == 7
    assert {m["source"] for m in body["measurements"]} == {"bench"}
    assert body["measurements"][0]["config"] == {"algo": "ring", "proto": "simple"}
    again = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "already imported" in again.output
    assert [b["batch_id"] for b in server.posted("/v1/measurements")] == [body["batch_id"]] * 2


def test_a_file_that_is_not_nccl_tests_output_is_named_and_fails(recording_server, tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    server = recording_server(lambda path, body: (202, {"accepted": 0, "duplicate_batch": False}))
    result = CliRunner().invoke(app, ["import", "nccl-tests", str(other), "--fabric-id", "f", "--server", server.url])
    assert result.exit_code == 1 and "notes.txt" in result.output and "Collective test starting" in result.output
    assert server.posted("/v1/measurements") == []


def test_nvidias_sample_csv_is_posted(recording_server) -> None:
    server = recording_server(lambda path, body: (202, {"accepted": len(body["measurements"]), "duplicate_batch": False}))
    sample = Path(__file__).parents[1] / "nccl" / "data" / "nvidia_sample_performance_data.csv"
    result = CliRunner().invoke(app, ["import", "nccl-csv", str(sample), "--fabric-id", "f", "--server", server.url])
    assert result.exit_code == 0, result.output
    assert "23 rows read, 0 refused, 23 stored" in result.output
    assert sum(len(b["measurements"]) for b in server.posted("/v1/measurements")) == 23

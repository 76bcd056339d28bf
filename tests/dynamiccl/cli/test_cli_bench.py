"""`dynamiccl fabrics` and `dynamiccl bench` as a user runs them."""

from typer.testing import CliRunner

from dynamiccl.cli.main import app

runner = CliRunner()


def test_fabrics_lists_every_preset():
    result = runner.invoke(app, ["fabrics"])
    assert result.exit_code == 0
    assert "h100-ib-16n" in result.output and "l40s-roce-2n" in result.output


def test_bench_prints_an_nccl_tests_like_table_with_the_oracle():
    result = runner.invoke(app, ["bench", "--fabric", "a100-ib-2n", "--oracle", "--collective", "AllGather",
                                 "--min-bytes", "1048576", "--max-bytes", "16777216"])
    assert result.exit_code == 0, result.output
    for heading in ("busbw", "NCCL picks", "best config", "headroom", "allgather"):
        assert heading in result.output
    assert "geometric-mean headroom" in result.output


def test_bench_names_the_presets_when_one_is_unknown():
    result = runner.invoke(app, ["bench", "--fabric", "tpu"])
    assert result.exit_code != 0
    assert "h100-ib-2n" in result.output

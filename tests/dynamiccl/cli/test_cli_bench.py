"""`dynamiccl fabrics` and `dynamiccl bench` as a user runs them."""

import pytest
import typer
from typer.testing import CliRunner

from dynamiccl.cli.main import app
from dynamiccl.schemas import Collective

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


def test_an_nccl_config_for_the_real_sweep_is_forced_on_the_swept_collective() -> None:
    from dynamiccl.cli.bench import _config_env

    env = _config_env("ring/simple/8", Collective.allgather)
    assert env == {"NCCL_ALGO": "allgather:Ring", "NCCL_PROTO": "allgather:Simple",
                   "NCCL_MIN_CTAS": "8", "NCCL_MAX_CTAS": "8"}
    with pytest.raises(typer.BadParameter, match="'ring': expected ALGO/PROTO"):
        _config_env("ring", Collective.allreduce)
    with pytest.raises(typer.BadParameter, match="warp"):
        _config_env("warp/simple", Collective.allreduce)


def _commands(group, path=()):
    """Every command path of a click group, nested groups included."""
    for name, command in group.commands.items():
        yield (*path, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_command_prints_its_help():
    import typer.main

    for path in _commands(typer.main.get_command(app)):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output, result.exception)

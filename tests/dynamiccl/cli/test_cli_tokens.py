"""`dynamiccl tokens issue`: one token per node agent, appended to the server's tokens file and
handed out once, never twice for one name."""

import json
import stat

from typer.testing import CliRunner

from dynamiccl.cli.main import app
from dynamiccl.server.auth import Scope, load_tokens

runner = CliRunner()


def test_each_node_gets_a_token_of_its_own_that_the_server_then_accepts(tmp_path):
    tokens_file = tmp_path / "tokens"
    result = runner.invoke(app, ["tokens", "issue", "gpu-node-1", "gpu-node-2", "--tokens-file", str(tokens_file)])
    assert result.exit_code == 0, result.output
    printed = dict(line.split(" ") for line in result.stdout.splitlines())
    assert set(printed) == {"gpu-node-1", "gpu-node-2"} and len(set(printed.values())) == 2
    accepted = load_tokens(tokens_file, env={})
    assert {name: token.secret for name, token in accepted.items()} == printed
    assert all(token.scopes == {Scope.agent} for token in accepted.values()), "agents may not re-pin or admin"
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600


def test_a_name_that_has_a_token_is_refused_and_nothing_is_written(tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("gpu-node-1:existing:agent\n")
    result = runner.invoke(app, ["tokens", "issue", "gpu-node-2", "gpu-node-1", "--tokens-file", str(tokens_file)])
    assert result.exit_code == 2 and "gpu-node-1" in result.stderr and "one token per agent" in result.stderr
    assert tokens_file.read_text() == "gpu-node-1:existing:agent\n"
    twice = runner.invoke(app, ["tokens", "issue", "a", "a", "--tokens-file", str(tokens_file)])
    assert twice.exit_code == 2 and "named twice" in twice.stderr


def test_a_name_that_cannot_be_a_token_name_is_refused(tmp_path):
    result = runner.invoke(app, ["tokens", "issue", "node:1", "--tokens-file", str(tmp_path / "tokens")])
    assert result.exit_code == 2 and "'node:1'" in result.stderr and not (tmp_path / "tokens").exists()


def test_for_kubernetes_the_tokens_come_as_a_secret_with_a_key_per_node(tmp_path):
    tokens_file = tmp_path / "tokens"
    result = runner.invoke(app, ["tokens", "issue", "gpu-node-1", "gpu-node-2", "--tokens-file", str(tokens_file),
                                 "--kubernetes-secret", "dynamiccl-agent-tokens"])
    assert result.exit_code == 0, result.output
    secret = json.loads(result.stdout)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "dynamiccl-agent-tokens"
    accepted = load_tokens(tokens_file, env={})
    assert secret["stringData"] == {name: token.secret for name, token in accepted.items()}

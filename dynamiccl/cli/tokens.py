"""`dynamiccl tokens issue`: one bearer token per node agent, so that the server counts each node
as a source of its own (the learner's corroboration and the rate limits are per token name)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(name="tokens", help="Bearer tokens of the tuning server.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def tokens() -> None:
    """Bearer tokens of the tuning server."""


@app.command()
def issue(
    names: list[str] = typer.Argument(..., help="one token per name: the nodes' names"),
    tokens_file: Path = typer.Option(..., help="the server's tokens file (--tokens-file of `dynamiccl server`); "
                                               "the new tokens are appended, created if missing"),
    scopes: str = typer.Option("agent", help="scopes of the new tokens: agent, read, admin (joined with ',')"),
    kubernetes_secret: str | None = typer.Option(
        None, help="print a Secret of this name holding one key per node (the agent DaemonSet mounts it and "
                   "reads the key of its node), instead of `name token` lines"),
) -> None:
    """Issue a token per node agent: appended to the server's tokens file, printed for the agents."""
    from dynamiccl.server.auth import TokenFileError, issue_tokens, parse_scopes

    try:
        issued = issue_tokens(tokens_file, names, parse_scopes(scopes, "--scopes"))
    except TokenFileError as error:
        typer.echo(f"dynamiccl tokens issue: {error}", err=True)
        raise typer.Exit(2) from None
    if kubernetes_secret:
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": kubernetes_secret}, "stringData": issued}
        typer.echo(json.dumps(secret, indent=2))
    else:
        for name, token in issued.items():
            typer.echo(f"{name} {token}")
    typer.echo(f"{len(issued)} token(s) appended to {tokens_file}: restart or roll the server to accept them",
               err=True)

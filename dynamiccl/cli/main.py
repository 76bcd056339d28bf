"""The `dynamiccl` command line."""

from __future__ import annotations

from pathlib import Path

import typer

from dynamiccl.cli import bench, importer, plugin, tokens
from dynamiccl.sim.feeder import sim_job

app = typer.Typer(
    name="dynamiccl",
    help="DynamICCL: learns which NCCL configuration is fastest on your fabric, and applies it.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("fabrics")(bench.fabrics)
app.command("bench")(bench.bench)
app.add_typer(plugin.app)
app.add_typer(importer.app)
app.add_typer(tokens.app)
app.command("sim-job")(sim_job)


@app.command()
def demo(
    rounds: int = typer.Option(24, min=2, help="tuning rounds per simulated job"),
    out: Path = typer.Option(Path("dynamiccl-demo.png"), help="where to write the figure"),
    real_steps: int = typer.Option(6, min=0, help="steps of the real gloo DP x TP x PP run (0: skip it)"),
    seed: int = typer.Option(0, help="seed of the simulated measurement noise"),
) -> None:
    """Run the whole loop here: a server, simulated jobs tuning online, a real gloo run through an agent."""
    try:
        from dynamiccl.workloads.demo import run_demo
    except ImportError as error:
        typer.echo(f"dynamiccl demo needs torch and matplotlib ({error}): run scripts/demo.sh, or "
                   "pip install torch==2.13.0 (the CPU build) and then 'dynamiccl[torch,demo]'", err=True)
        raise typer.Exit(1) from None
    run_demo(rounds=rounds, out=out, real_steps=real_steps, seed=seed)


@app.command()
def doctor(
    agent_url: str = typer.Option(None, "--agent", envvar="DYNAMICCL_AGENT_URL",
                                  help="the node agent's local URL (default http://127.0.0.1:7461; unix:/path/agent.sock for a socket)"),
    server_url: str | None = typer.Option(None, "--server", envvar="DYNAMICCL_SERVER", help="the tuning server"),
) -> None:
    """Check, on this node, what DynamICCL depends on: torch and NCCL, GPUs and topology, the tuner plugin
    (built, and loaded by real NCCL), the hook's NCCL path, Inspector, agent, server and clock."""
    import os

    from rich.console import Console
    from rich.markup import escape

    from dynamiccl.agent.launch.doctor import Node, Status, diagnose
    from dynamiccl.agent_api import DEFAULT_AGENT_URL

    node = Node(environ=dict(os.environ), agent_url=agent_url or DEFAULT_AGENT_URL, server_url=server_url)
    styles = {Status.ok: "green", Status.warn: "yellow", Status.fail: "red", Status.skip: "dim"}
    console = Console(soft_wrap=True, highlight=False)
    failed = False
    for finding in diagnose(node):
        failed |= finding.status is Status.fail
        fix = f" [bold]fix:[/bold] {escape(finding.fix)}" if finding.fix else ""
        console.print(f"[{styles[finding.status]}]{finding.status.value:<4}[/] {finding.check:<15} "
                      f"{escape(finding.detail)}{fix}")
    if failed:
        raise typer.Exit(1)


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
    workers: int = typer.Option(1, min=1, max=64, help="server processes on the one port (each with its own learner)"),
) -> None:
    """Run the tuning server."""
    from dynamiccl.server.cli import run_server

    run_server(host=host, port=port, database=database, tokens_file=tokens_file, workers=workers)


@app.command()
def agent(
    server: str = typer.Option(..., envvar="DYNAMICCL_SERVER", help="URL of the tuning server"),
    listen: str = typer.Option("127.0.0.1:7461", help="the local API, for this node's jobs only: "
                               "unix:/path/agent.sock (a socket shared with them) or a loopback host:port"),
    metrics_listen: str | None = typer.Option(None, help="host:port serving /metrics to Prometheus (and nothing "
                                                         "else); default: /metrics on the local API only"),
    spool: Path | None = typer.Option(
        None, envvar="DYNAMICCL_SPOOL", help="spool directory (default ~/.cache/dynamiccl/agent)"
    ),
    fabric_id: str | None = typer.Option(None, help="fabric id (default: derived from the hardware)"),
    token: str | None = typer.Option(None, envvar="DYNAMICCL_TOKEN", help="bearer token for the server"),
    token_file: Path | None = typer.Option(None, envvar="DYNAMICCL_TOKEN_FILE",
                                           help="read the bearer token from this file (`dynamiccl tokens issue`)"),
    window: float = typer.Option(10.0, min=0.05, help="aggregation window in seconds"),
    inspector_dir: Path | None = typer.Option(
        None, envvar="NCCL_INSPECTOR_DUMP_DIR", help="follow NCCL Inspector dumps in this directory"
    ),
    gpu: str | None = typer.Option(None, help="override the detected GPU model"),
    gpus_per_node: int | None = typer.Option(None, min=1, help="override the GPU count"),
    intra_node: str | None = typer.Option(None, help="override: nvswitch | nvlink | pcie"),
    inter_node: str | None = typer.Option(None, help="override: ib-ndr400 | ib-hdr200 | roce-400 | ... | none"),
    nics_per_node: int | None = typer.Option(None, min=0, help="override the NIC count"),
    nccl_version: str | None = typer.Option(None, help="override the NCCL version"),
    sharp: bool | None = typer.Option(None, "--sharp/--no-sharp", help="override: in-network reduction"),
    max_backoff: float = typer.Option(30.0, min=0.01, help="longest wait between retries to the server (s)"),
    rules_dir: Path | None = typer.Option(None, help="where plugin-mode jobs' rules files are kept, shared with "
                                                     "the node's jobs (default SPOOL/rules)"),
) -> None:
    """Run the node agent: collects measurements, spools and sends them, serves recommendations."""
    from dynamiccl.agent.daemon.cli import run_agent
    from dynamiccl.agent.daemon.fabric_detect import FabricOverrides

    overrides = FabricOverrides(
        gpu=gpu, gpus_per_node=gpus_per_node, intra_node=intra_node, inter_node=inter_node,
        nics_per_node=nics_per_node, nccl_version=nccl_version, sharp=sharp,
    )
    try:
        run_agent(server=server, listen=listen, spool=spool, fabric_id=fabric_id, token=token, token_file=token_file,
                  window_s=window, inspector_dir=inspector_dir, overrides=overrides, max_backoff_s=max_backoff,
                  metrics_listen=metrics_listen, rules_dir=rules_dir)
    except ValueError as error:  # a bad address or fabric id: said plainly, before anything starts
        typer.echo(f"dynamiccl agent: {error}", err=True)
        raise typer.Exit(2) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    job: str | None = typer.Option(None, help="job id shared by all nodes (default: $DYNAMICCL_JOB_ID, "
                                              "$SLURM_JOB_ID, else a hash of the command)"),
    agent_url: str | None = typer.Option(None, "--agent", envvar="DYNAMICCL_AGENT_URL",
                                         help="node agent URL (default http://127.0.0.1:7461)"),
    server_url: str | None = typer.Option(None, "--server", help="ask this tuning server directly instead"),
    mode: str = typer.Option("env", help="env: NCCL variables | plugin: DynamICCL's tuner plugin with per-size rules | off: profiler only"),
    fabric_id: str | None = typer.Option(None, envvar="DYNAMICCL_FABRIC_ID", help="fabric id (with --server)"),
    token: str | None = typer.Option(None, envvar="DYNAMICCL_TOKEN", help="bearer token (with --server)"),
    tuner_plugin: str | None = typer.Option(None, envvar="DYNAMICCL_TUNER_PLUGIN",
                                            help="NCCL tuner plugin (mode plugin; default: DynamICCL's, "
                                                 "built automatically; another one means env mode)"),
) -> None:
    """Run COMMAND (after --) with the job's learned NCCL configuration and the profiler on."""
    from dynamiccl.agent.launch.launcher import Mode
    from dynamiccl.agent.launch.launcher import launch as run_launch

    try:
        chosen = Mode(mode.lower())
    except ValueError:
        raise typer.BadParameter("must be env, plugin or off", param_hint="--mode") from None
    raise typer.Exit(run_launch(ctx.args, job=job, agent_url=agent_url, server_url=server_url, mode=chosen,
                                fabric_id=fabric_id, token=token, tuner_plugin=tuner_plugin))


if __name__ == "__main__":
    app()

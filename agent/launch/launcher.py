"""`dynamiccl launch`: start a job with its learned NCCL configuration and the profiler on.

1. Ask for the job's recommendation: the node agent's local API (which
   serves the server's pinned answer, or this job's cached one when the
   server is away), or a server directly with `--server` (pinned by job id).
   A few seconds at most: nothing here may block a launch, so any failure
   means the NCCL default, said plainly.
2. Apply it: mode env sets `env` as process-wide NCCL variables; mode plugin
   loads DynamICCL's tuner plugin (built on first use) with the per-size
   `tuner_config` rules instead, and no env: the rules leave every call they
   do not cover to NCCL, which an env would restrict. Those rules are not for
   another tuner plugin (NCCL's example plugin runs every call no rule
   matches on one channel): named one, the launch says so and uses env.
   NCCL_* variables the user already set win, but for the tuner plugin: mode
   plugin always sets NCCL_TUNER_PLUGIN and NCCL_TUNER_CONFIG_FILE, saying
   which tuner it displaces (the user's own, or aws-ofi-nccl's, which sets
   NCCL_TUNER_PLUGIN itself when it is unset); mode env says when another
   tuner plugin will be loaded that may override the env per call.
   With DynamICCL's own plugin the job is also tuned online: the rules file
   is registered with the node agent, which appends a section per tuning
   round (agent/plugin/online.py); rounds are `$DYNAMICCL_ROUND_CALLS`
   calls long (0: off), a job-wide value every node must share.
3. Turn the profiler on for the unmodified script (sitecustomize on
   PYTHONPATH, TORCH_NCCL_ENABLE_TIMING=1 from the first collective).
4. Run the command with SIGINT/SIGTERM forwarded; return its exit status.
   Then unregister the rules file (publication stops) and remove it, and
   say how many collective calls of the job this node's agent received
   (and, when none, why that may be).

The command runs in its own process group, so a terminal's Ctrl-C reaches
it once, through the forwarding (not twice).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

from dynamiccl.agent.plugin.build import PluginBuildError
from dynamiccl.agent.plugin.build import build as build_plugin
from dynamiccl.agent.plugin.online import DEFAULT_ROUND_CALLS, ROUND_CALLS_ENV
from dynamiccl.agent.plugin.report import remove_reports
from dynamiccl.agent.plugin.rules import HEADER_TAG, is_own_plugin
from dynamiccl.agent_api import AGENT_URL_ENV, DEFAULT_AGENT_URL, DEFAULT_ANSWER, JOB_ID_FILE, Answer, path_safe
from dynamiccl.agent_client import AgentClient, AgentError
from dynamiccl.client import DynamicclClient

RECOMMEND_TIMEOUT_S = 3.0
REGISTER_TIMEOUT_S = 3.0
SITECUSTOMIZE_DIR = Path(__file__).resolve().parent.parent / "hook" / "sitecustomize"
#: Files by which aws-ofi-nccl (the network plugin of AWS's EFA) is found on a library path.
AWS_OFI_NCCL_FILES = ("libnccl-net-ofi.so", "libnccl-ofi-tuner.so")


class Mode(StrEnum):
    env = "env"
    plugin = "plugin"
    off = "off"


@dataclass
class Plan:
    """The child's environment and what to tell the user about it."""

    env: dict[str, str]
    notes: list[str] = field(default_factory=list)
    rules_file: Path | None = None
    round_calls: int = 0  # > 0: the rules file is to be tuned online by the agent


def job_name(job: str | None, environ: Mapping[str, str], command: Sequence[str]) -> tuple[str, str]:
    """The job id every node must agree on, and where it came from."""
    if job:
        return job, "--job"
    for variable in ("DYNAMICCL_JOB_ID", "SLURM_JOB_ID"):
        if environ.get(variable):
            return environ[variable], f"${variable}"
    digest = hashlib.sha1("\0".join(command).encode()).hexdigest()[:12]
    return f"cmd-{digest}", "a hash of the command line (same command, same job)"


def ask_agent(agent_url: str, job: str, transport: httpx.BaseTransport | None = None) -> Answer:
    try:
        with AgentClient(agent_url, timeout=RECOMMEND_TIMEOUT_S, transport=transport) as agent:
            answer = agent.recommend(job)
    except AgentError as error:
        return Answer(DEFAULT_ANSWER, "default", f"{error}; NCCL default")
    except (httpx.HTTPError, ValueError) as error:
        return Answer(DEFAULT_ANSWER, "default",
                      f"the agent at {agent_url} is unreachable ({error.__class__.__name__}); NCCL default")
    return Answer(answer, answer.source, answer.reason)


def ask_server(server_url: str, fabric_id: str | None, job: str, token: str | None,
               transport: httpx.BaseTransport | None = None) -> Answer:
    if not fabric_id:
        return Answer(DEFAULT_ANSWER, "default", "--server needs --fabric-id; NCCL default")
    try:
        with DynamicclClient(server_url, token=token, timeout=RECOMMEND_TIMEOUT_S, attempts=1,
                             transport=transport) as client:
            response = client.recommend(fabric_id, [], job_id=job)
        return Answer(response, "server", "the server's pinned recommendation for this job")
    except Exception as error:  # noqa: BLE001 - any failure means defaults, never a blocked launch
        return Answer(DEFAULT_ANSWER, "default", f"the server at {server_url} failed ({error}); NCCL default")


def plan_env(
    environ: Mapping[str, str],
    answer: Answer | None,
    mode: Mode,
    job: str,
    agent_url: str,
    tuner_plugin: str | None,
) -> Plan:
    plan = Plan(env=dict(environ))
    if answer is not None:
        if mode is Mode.plugin and _rules_fit(plan, tuner_plugin, rule_count(answer.response.tuner_config)):
            _apply_rules(plan, environ, answer.response.tuner_config, tuner_plugin, job)
        else:
            _apply_env(plan, environ, answer.response.env)
    _enable_profiler(plan, environ, job, agent_url)
    return plan


def _rules_fit(plan: Plan, plugin: str | None, count: int) -> bool:
    """Whether the rules can run as written: only DynamICCL's plugin leaves what they do not
    cover to NCCL. Otherwise a note says why env is used instead."""
    if not plugin:
        plan.notes.append(f"mode plugin: no tuner plugin known (set $DYNAMICCL_TUNER_PLUGIN or "
                          f"--tuner-plugin): falling back to env mode, {count} rules unused")
        return False
    if not is_own_plugin(plugin):
        plan.notes.append(
            f"mode plugin: {plugin} is not DynamICCL's tuner plugin, and the server's rules are written for "
            "DynamICCL's: they name only the calls the recommendation changes and leave channels -1 where "
            "NCCL should choose, while NCCL's example plugin (and tuners built from it) run every call no rule "
            f"matches, and every -1, on ONE channel. Not loading it: env mode instead, {count} rules unused")
        return False
    return True


def on_library_path(environ: Mapping[str, str], names: Sequence[str]) -> list[Path]:
    """The files of these names in the directories of LD_LIBRARY_PATH, in its order."""
    dirs = [Path(d) for d in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    return [d / name for d in dirs for name in names if (d / name).is_file()]


def other_tuner(environ: Mapping[str, str]) -> str | None:
    """The tuner NCCL would load for this job without DynamICCL's: the user's NCCL_TUNER_PLUGIN, or
    aws-ofi-nccl's (found on LD_LIBRARY_PATH or named by NCCL_NET_PLUGIN), or None."""
    if environ.get("NCCL_TUNER_PLUGIN"):
        return f"your NCCL_TUNER_PLUGIN={environ['NCCL_TUNER_PLUGIN']}"
    if "ofi" in environ.get("NCCL_NET_PLUGIN", "").lower() or on_library_path(environ, AWS_OFI_NCCL_FILES):
        return "aws-ofi-nccl's tuner (it sets NCCL_TUNER_PLUGIN itself when it is unset)"
    return None


def _set(plan: Plan, environ: Mapping[str, str], name: str, value: str, what: str) -> None:
    if name in environ and environ[name] != value:
        plan.notes.append(f"{name}={environ[name]} kept: you set it ({what} {value!r})")
    else:
        plan.env[name] = value
        plan.notes.append(f"{name}={value}")


def _apply_env(plan: Plan, environ: Mapping[str, str], env: Mapping[str, str]) -> None:
    if not env:
        plan.notes.append("no NCCL variables to set: NCCL chooses")
    for name, value in sorted(env.items()):
        _set(plan, environ, name, value, "recommended")
    tuner = other_tuner(environ)
    if tuner is not None:
        plan.notes.append(f"{tuner} will be loaded: a tuner plugin decides every call within what the env "
                          "leaves enabled and may set its channel count, so it may override this env "
                          "(--mode plugin loads DynamICCL's plugin in its place)")


def _force(plan: Plan, environ: Mapping[str, str], name: str, value: str) -> None:
    """Set `name` even over the user's value (the plugin and its rules only work together)."""
    if environ.get(name) not in (None, value):
        plan.notes.append(f"{name}={environ[name]} replaced: mode plugin needs {name}={value}")
    else:
        plan.notes.append(f"{name}={value}")
    plan.env[name] = value


def rule_count(rules: str) -> int:
    return sum(1 for line in rules.splitlines() if line.split("#", 1)[0].strip())


def round_calls(environ: Mapping[str, str]) -> tuple[int, str | None]:
    """Calls per online tuning round from the environment (0: off), and a note when it is unusable."""
    text = environ.get(ROUND_CALLS_ENV, "").strip()
    if not text:
        return DEFAULT_ROUND_CALLS, None
    if text.isdigit():
        return int(text), None
    return 0, f"${ROUND_CALLS_ENV}={text!r} is not a call count: online tuning off"


def _apply_rules(plan: Plan, environ: Mapping[str, str], rules: str, plugin: str, job: str) -> None:
    count = rule_count(rules)
    online, why_not = round_calls(environ)
    if why_not:
        plan.notes.append(why_not)
    if count == 0 and not online:
        tuner = other_tuner(environ)
        plan.notes.append("mode plugin: the recommendation changes no call: plugin not loaded, "
                          + (f"{tuner} decides" if tuner else "NCCL chooses"))
        return
    if count == 0:  # an empty version 0: the plugin loads, NCCL decides until the first round
        rules = f"# {HEADER_TAG} version=0 from_call=0\n"
    handle = tempfile.NamedTemporaryFile(
        "w", prefix=f"dynamiccl-{path_safe(job)}-", suffix=".rules", delete=False, encoding="utf-8"
    )
    with handle:
        handle.write(rules if rules.endswith("\n") else rules + "\n")
    plan.rules_file = Path(handle.name)
    plan.round_calls = online
    plan.notes.append(f"{count} tuner rules written to {handle.name}; every other call is NCCL's choice")
    _force(plan, environ, "NCCL_TUNER_CONFIG_FILE", handle.name)
    tuner = other_tuner(environ)
    if tuner is not None and environ.get("NCCL_TUNER_PLUGIN") != plugin:
        plan.notes.append(f"DynamICCL's tuner plugin displaces {tuner}: NCCL loads one tuner")
    _force(plan, environ, "NCCL_TUNER_PLUGIN", plugin)
    if online:
        plan.env[ROUND_CALLS_ENV] = str(online)


def register_online(agent_url: str, job: str, plan: Plan, transport: httpx.BaseTransport | None = None) -> str:
    """Hand the job's launch rules to the node agent for online tuning: the job then runs on the
    agent's copy (the launch's own file is removed), or on the launch's rules alone if the agent
    refuses. A note saying how it went."""
    assert plan.rules_file is not None
    try:
        with AgentClient(agent_url, timeout=REGISTER_TIMEOUT_S, transport=transport) as agent:
            registered = agent.register_plugin(job, plan.rules_file.read_text(encoding="utf-8"), plan.round_calls)
    except (httpx.HTTPError, ValueError, AgentError) as error:
        plan.round_calls = 0
        plan.env.pop(ROUND_CALLS_ENV, None)
        if isinstance(error, AgentError):
            return f"online tuning off: {error}"
        return f"online tuning off: the agent at {agent_url} is unreachable ({error.__class__.__name__})"
    plan.rules_file.unlink()
    plan.notes[:] = [note.replace(str(plan.rules_file), registered.rules_file) for note in plan.notes]
    plan.rules_file = Path(registered.rules_file)
    plan.env["NCCL_TUNER_CONFIG_FILE"] = registered.rules_file
    return f"online tuning on: a rules section every {plan.round_calls} calls, from the agent at {agent_url}"


def unregister_online(agent_url: str, rules_file: Path, transport: httpx.BaseTransport | None = None) -> None:
    """Stop the agent's publication for this job (it also stops by itself once the file is gone)."""
    try:
        with AgentClient(agent_url, timeout=REGISTER_TIMEOUT_S, transport=transport) as agent:
            agent.unregister_plugin(str(rules_file))
    except (httpx.HTTPError, ValueError, AgentError):
        pass


def own_plugin(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """DynamICCL's tuner plugin, compiled if this version has no build yet: its path, or None and why."""
    try:
        built = build_plugin(environ=environ)
    except PluginBuildError as error:
        return None, f"mode plugin: cannot build DynamICCL's tuner plugin: {error}"
    return str(built.path), f"DynamICCL's tuner plugin {'built' if built.compiled else 'up to date'}: {built.path}"


def _enable_profiler(plan: Plan, environ: Mapping[str, str], job: str, agent_url: str) -> None:
    if not (SITECUSTOMIZE_DIR / "sitecustomize.py").is_file():
        plan.notes.append(f"profiler off: {SITECUSTOMIZE_DIR} is missing from this installation")
        return
    plan.env.update(DYNAMICCL_HOOK="1", DYNAMICCL_JOB_ID=job, **{AGENT_URL_ENV: agent_url})
    # Timing must be on before the first collective: enabling it later aborts the communicator.
    _set(plan, environ, "TORCH_NCCL_ENABLE_TIMING", "1", "the profiler wants")
    paths = [str(SITECUSTOMIZE_DIR), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    plan.env["PYTHONPATH"] = os.pathsep.join(paths)
    plan.notes.append(f"profiler on: collectives reported to {agent_url} as job {job}")
    inspector_dir = environ.get("DYNAMICCL_INSPECTOR_DIR")
    if inspector_dir:  # the agent's Inspector dump dir: this job's records in a folder named after it
        folder = Path(inspector_dir) / path_safe(job)
        _set(plan, environ, "NCCL_INSPECTOR_DUMP_DIR", str(folder), "for the agent")
        if plan.env.get("NCCL_INSPECTOR_DUMP_DIR") == str(folder):
            _name_dump_folder(plan, folder, job)


def _name_dump_folder(plan: Plan, folder: Path, job: str) -> None:
    """Write the job id into its Inspector dump folder, whose name had to be made path-safe: the
    agent then attributes the records to the same job id as the hook's measurements."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".job-", delete=False, encoding="utf-8") as handle:
            handle.write(job)
        os.replace(handle.name, folder / JOB_ID_FILE)
    except OSError as error:
        plan.notes.append(f"NCCL Inspector records will be the job {folder.name!r} ({folder}: {error.strerror})")


def run(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run the command, forwarding SIGINT/SIGTERM; its exit status (128+N when killed by signal N)."""
    try:
        child = subprocess.Popen(list(command), env=dict(env), process_group=0)
    except OSError as error:
        Console(stderr=True).print(f"[red]dynamiccl launch: cannot run {command[0]!r}: {error}[/red]")
        return 127

    def forward(signum: int, frame: FrameType | None) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def job_ended(agent_url: str, job: str, transport: httpx.BaseTransport | None = None) -> str:
    """What this node's agent received from the job, in a sentence (the agent counts silent jobs)."""
    try:
        with AgentClient(agent_url, timeout=REGISTER_TIMEOUT_S, transport=transport) as agent:
            received = agent.job_ended(job)
    except (httpx.HTTPError, ValueError, AgentError) as error:
        return f"whether the job's collectives were timed is unknown: the agent at {agent_url} did not say ({error})"
    if received.measurements:
        return (f"{received.calls:,} collective calls of {received.contexts} kinds timed and received by the "
                f"agent at {agent_url} ({received.measurements:,} measurements)")
    return (f"the agent at {agent_url} received no collective from this job. Either it issued none (no "
            "torch.distributed process group), or the profiler was not active in its processes (a "
            "'dynamiccl hook:' line above says why), or its ranks could not reach the agent, or every "
            "communicator's lowest rank, the one that reports its calls, runs on another node")


def report(console: Console, job: str, job_from: str, answer: Answer | None, mode: Mode, plan: Plan) -> None:
    console.print(f"[bold]dynamiccl launch[/bold]: job [cyan]{job}[/cyan] (from {job_from}), mode {mode.value}")
    if answer is None:
        console.print("  recommendation: not asked (mode off)")
    else:
        style = "green" if answer.source == "server" else "yellow"
        console.print(f"  recommendation: [{style}]{answer.source}[/{style}]: {answer.reason}")
        response = answer.response
        console.print(f"  {len(response.recommendations)} recommendations, {len(response.env)} NCCL "
                      f"variables, {rule_count(response.tuner_config)} tuner rules")
    for note in plan.notes:
        console.print(f"  {note}", markup=False, highlight=False)


def launch(
    command: Sequence[str],
    job: str | None = None,
    agent_url: str | None = None,
    server_url: str | None = None,
    mode: Mode = Mode.env,
    fabric_id: str | None = None,
    token: str | None = None,
    tuner_plugin: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    environ = dict(os.environ if environ is None else environ)
    console = Console(stderr=True)
    if not command:
        console.print("[red]dynamiccl launch: no command given (dynamiccl launch [OPTIONS] -- COMMAND ...)[/red]")
        return 2
    job, job_from = job_name(job, environ, command)
    agent_url = agent_url or environ.get(AGENT_URL_ENV) or DEFAULT_AGENT_URL
    tuner_plugin = tuner_plugin or environ.get("DYNAMICCL_TUNER_PLUGIN") or None
    plugin_note = None
    if mode is Mode.plugin and not tuner_plugin:
        tuner_plugin, plugin_note = own_plugin(environ)
    answer: Answer | None = None
    if mode is not Mode.off:
        if server_url:
            answer = ask_server(server_url, fabric_id or environ.get("DYNAMICCL_FABRIC_ID"), job, token)
        else:
            answer = ask_agent(agent_url, job)
    plan = plan_env(environ, answer, mode, job, agent_url, tuner_plugin)
    if plugin_note:
        plan.notes.insert(0, plugin_note)
    if plan.rules_file is not None and plan.round_calls:
        plan.notes.append(register_online(agent_url, job, plan))
    report(console, job, job_from, answer, mode, plan)
    try:
        return run(command, plan.env)
    finally:
        if plan.rules_file is not None:
            if plan.round_calls:  # the agent's file: it removes it
                unregister_online(agent_url, plan.rules_file)
            else:
                plan.rules_file.unlink(missing_ok=True)
            remove_reports(plan.rules_file)
        if plan.env.get("DYNAMICCL_HOOK") == "1":
            console.print(f"dynamiccl launch: {job_ended(agent_url, job)}", markup=False, highlight=False)

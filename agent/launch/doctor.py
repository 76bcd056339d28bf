"""`dynamiccl doctor`: checks, on a node, what DynamICCL depends on; one line per check.

Each check returns a `Finding` (ok / warn / fail / skip) with what was seen and,
when something is wrong, the fix. Checks that need a GPU run one rank of real
NCCL in a child process (`nccl_probe`) with NCCL_DEBUG=INFO, DynamICCL's tuner
plugin and a rules file, and look in NCCL's log for the plugin's init and rule
lines; on a machine without a GPU they are skipped, saying so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx

from dynamiccl import __version__
from dynamiccl.agent.daemon.fabric_detect import TorchInfo, detect_fabric, probe_torch
from dynamiccl.agent.launch.launcher import on_library_path
from dynamiccl.agent.plugin.build import PluginBuildError, build
from dynamiccl.agent.plugin.driver import EXPORTED_VERSIONS, TunerLibrary, plugin_environment
from dynamiccl.agent_client import AgentClient, AgentError
from dynamiccl.schemas import Algo, Collective, Proto

PROBE_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 3.0
MAX_CLOCK_SKEW_S = 5.0
INSPECTOR_LIBRARY = "libnccl-profiler-inspector.so"
PROBE_RULE = "allreduce,0,1099511627776,ring,simple,-1,-1,-1\n"


class Status(StrEnum):
    ok = "ok"
    warn = "warn"
    fail = "fail"
    skip = "skip"  # could not be checked here


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Node:
    """What the checks look at; the defaults are this machine."""

    environ: Mapping[str, str]
    agent_url: str
    server_url: str | None
    torch_probe: Callable[[], TorchInfo | None] = probe_torch
    run_probe: Callable[[Mapping[str, str]], subprocess.CompletedProcess[str]] | None = None

    @cached_property
    def torch_info(self) -> TorchInfo | None:
        """GPUs and NCCL as torch sees them (None: no CUDA), probed once."""
        return self.torch_probe()


def run_nccl_probe(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynamiccl.agent.launch.nccl_probe"], env=dict(env),
                          capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)


def check_versions(node: Node) -> Iterator[Finding]:
    yield Finding("dynamiccl", Status.ok, f"dynamiccl {__version__}, Python {sys.version.split()[0]}")
    try:
        import torch
    except ImportError:
        yield Finding("torch", Status.warn, "torch is not installed: the in-process hook cannot run here",
                      "install torch in the training environment (the server and agent do not need it)")
        return
    yield Finding("torch", Status.ok, f"torch {torch.__version__}")


def check_gpus(node: Node) -> Iterator[Finding]:
    info = node.torch_info
    if info is None or not info.gpu_names:
        yield Finding("GPUs", Status.skip, "no CUDA GPU visible to torch: NCCL, the plugin inside NCCL and the "
                      "hook's NCCL path cannot be checked here")
        return
    names = ", ".join(sorted(set(info.gpu_names)))
    yield Finding("GPUs", Status.ok, f"{len(info.gpu_names)} x {names}")
    if info.nccl_version:
        yield Finding("NCCL", Status.ok, f"NCCL {info.nccl_version} (torch's)")
    else:
        yield Finding("NCCL", Status.warn, "torch reports no NCCL version", "use a CUDA build of torch with NCCL")
    detected = detect_fabric(torch_probe=lambda: info)
    fabric = detected.fabric
    yield Finding("topology", Status.ok,
                  f"{fabric.gpus_per_node} x {fabric.gpu}, intra-node {fabric.intra_node}, inter-node "
                  f"{fabric.inter_node} x{fabric.nics_per_node} ({'; '.join(detected.notes)})")


def check_plugin(node: Node) -> Iterator[Finding]:
    try:
        built = build(environ=node.environ)
    except PluginBuildError as error:
        yield Finding("plugin build", Status.fail, str(error).splitlines()[0],
                      "install a C compiler (cc, gcc or clang) or set $CC; --mode plugin falls back to env without it")
        return
    yield Finding("plugin build", Status.ok, str(built.path))
    with tempfile.TemporaryDirectory(prefix="dynamiccl-doctor-") as tmp:
        rules = Path(tmp) / "doctor.rules"
        rules.write_text(PROBE_RULE)
        yield _plugin_abi(built.path, rules)
        yield from _nccl_checks(node, built.path, rules)


def _plugin_abi(library: Path, rules: Path) -> Finding:
    """Every exported table loads and applies a rule, driven from Python as NCCL drives it."""
    try:
        with plugin_environment({"NCCL_TUNER_CONFIG_FILE": str(rules)}):
            for version in EXPORTED_VERSIONS:
                with TunerLibrary(library, version=version).communicator(8, 1) as comm:
                    decision = comm.choose(Collective.allreduce, 1 << 20)
                if (decision.algo, decision.proto) != (Algo.ring, Proto.simple):
                    return Finding("plugin ABI", Status.fail,
                                   f"tuner API v{version} did not apply the rule: {decision}",
                                   "rebuild with `dynamiccl plugin build --force`")
    except (OSError, AttributeError, RuntimeError) as error:
        return Finding("plugin ABI", Status.fail, f"{library}: {error}", "rebuild with `dynamiccl plugin build --force`")
    versions = ", ".join(f"v{v}" for v in EXPORTED_VERSIONS)
    return Finding("plugin ABI", Status.ok, f"tuner API {versions} each load and apply a rule (without NCCL)")


def _nccl_checks(node: Node, library: Path, rules: Path) -> Iterator[Finding]:
    info = node.torch_info
    if info is None or not info.gpu_names:
        for check in ("plugin in NCCL", "hook NCCL path"):
            yield Finding(check, Status.skip, "no GPU: needs one rank of real NCCL")
        return
    env = {**node.environ, "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,TUNING,ENV",
           "NCCL_TUNER_PLUGIN": str(library), "NCCL_TUNER_CONFIG_FILE": str(rules),
           "DYNAMICCL_TUNER_LOG_RULES": "1", "TORCH_NCCL_ENABLE_TIMING": "1", "DYNAMICCL_HOOK": "0"}
    started = time.monotonic()
    try:
        done = (node.run_probe or run_nccl_probe)(env)
    except subprocess.TimeoutExpired:
        yield Finding("plugin in NCCL", Status.fail, f"the one-rank NCCL probe ran past {PROBE_TIMEOUT_S:.0f} s")
        return
    log = done.stdout + done.stderr
    plugin_lines = [line for line in log.splitlines() if "DynamICCL tuner:" in line]
    init = [line for line in plugin_lines if "rule sections known" in line]
    rule = [line for line in plugin_lines if " line 1 rule:" in line]
    if init and rule:
        yield Finding("plugin in NCCL", Status.ok, f"NCCL loaded it: {init[0].strip()} | {rule[0].strip()}")
    else:
        tail = " | ".join(line.strip() for line in log.splitlines()[-3:])
        yield Finding("plugin in NCCL", Status.fail,
                      f"no init{'' if init else ' (missing)'} and rules{'' if rule else ' (missing)'} lines from "
                      f"DynamICCL's plugin in NCCL's log (exit {done.returncode}): {tail}",
                      "check NCCL_TUNER_PLUGIN is not overridden and that this NCCL loads tuner plugins (2.21+)")
    result = _last_json(done.stdout)
    timed = (result or {}).get("timed", {}).get("allreduce", {})
    if timed.get("count"):
        yield Finding("hook NCCL path", Status.ok,
                      f"{timed['count']} of {result['calls']} all-reduces timed by ProcessGroupNCCL's completion "
                      f"hook, mean {timed['mean_us']:.1f} us (NCCL {result['nccl_version']}, probe "
                      f"{time.monotonic() - started:.1f} s)")
    else:
        yield Finding("hook NCCL path", Status.fail,
                      f"no all-reduce timed (exit {done.returncode}; hook stats {(result or {}).get('hook')})",
                      "launch with TORCH_NCCL_ENABLE_TIMING=1 (dynamiccl launch sets it) and a torch with "
                      "_register_on_completion_hook")


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def check_inspector(node: Node) -> Iterator[Finding]:
    named = node.environ.get("NCCL_PROFILER_PLUGIN", "")
    found = on_library_path(node.environ, (INSPECTOR_LIBRARY,))
    if "inspector" in named.lower() or found:
        yield Finding("NCCL Inspector", Status.ok, named or str(found[0]))
    else:
        yield Finding("NCCL Inspector", Status.warn, "not found (NCCL_PROFILER_PLUGIN unset, "
                      f"{INSPECTOR_LIBRARY} not on LD_LIBRARY_PATH): only the torch hook reports",
                      "optional: build NCCL's ext-profiler/inspector and run the agent with --inspector-dir")


def _get(url: str) -> httpx.Response | str:
    try:
        return httpx.get(url, timeout=HTTP_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError as error:
        return f"{error.__class__.__name__}: {error}"


def _agent_health(url: str) -> dict[str, Any] | str:
    try:
        with AgentClient(url, timeout=HTTP_TIMEOUT_S) as agent:
            return agent.health()
    except (httpx.HTTPError, AgentError, ValueError) as error:
        return f"{error.__class__.__name__}: {error}"


def check_services(node: Node) -> Iterator[Finding]:
    health = _agent_health(node.agent_url)
    if isinstance(health, str):
        yield Finding("agent", Status.warn, f"{node.agent_url}: {health}",
                      "start `dynamiccl agent --server URL` on this node (jobs then start on NCCL's defaults)")
    else:
        registered = "registered" if health.get("registered") else "not yet registered with its server"
        yield Finding("agent", Status.ok, f"{node.agent_url}: fabric {health.get('fabric_id')}, {registered}, "
                      f"{health.get('spool_depth')} batches spooled")
    if node.server_url is None:
        yield Finding("server", Status.skip, "no server named (--server or $DYNAMICCL_SERVER)")
        yield Finding("clock", Status.skip, "no server to compare the clock with")
        return
    sent = time.time()
    server = _get(node.server_url.rstrip("/") + "/healthz")
    if isinstance(server, str) or server.status_code != 200:
        why = server if isinstance(server, str) else f"answered {server.status_code}"
        yield Finding("server", Status.fail, f"{node.server_url}: {why}", "check the URL, network and firewall")
        yield Finding("clock", Status.skip, "the server did not answer")
        return
    yield Finding("server", Status.ok, f"{node.server_url}: {server.json().get('status', 'ok')}")
    yield _clock(server, sent)


def _clock(response: httpx.Response, sent: float) -> Finding:
    """Measurements carry this node's timestamps: compare them with the server's Date header."""
    date = response.headers.get("date")
    if not date:
        return Finding("clock", Status.skip, "the server sent no Date header")
    skew = parsedate_to_datetime(date).timestamp() - (sent + time.time()) / 2
    if abs(skew) > MAX_CLOCK_SKEW_S:
        return Finding("clock", Status.warn,
                       f"this node's clock is {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} the server's",
                       "run chrony or ntpd on every node")
    return Finding("clock", Status.ok, f"within {MAX_CLOCK_SKEW_S:.0f} s of the server's ({-skew:+.1f} s, 1 s resolution)")


CHECKS = (check_versions, check_gpus, check_plugin, check_inspector, check_services)


def diagnose(node: Node) -> Iterator[Finding]:
    for check in CHECKS:
        yield from check(node)

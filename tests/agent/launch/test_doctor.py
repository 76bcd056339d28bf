"""`dynamiccl doctor`: one finding per check, what it could not check said so, the NCCL probe's log read."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from dynamiccl.agent.daemon.fabric_detect import TorchInfo
from dynamiccl.agent.launch.doctor import Finding, Node, Status, _clock, diagnose
from dynamiccl.agent.plugin.driver import TunerLibrary, plugin_environment
from dynamiccl.cli.main import app

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler")
DEAD = "http://127.0.0.1:9"


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def cpu_node(tmp_path: Path, **kwargs) -> Node:
    environ = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    return Node(environ=environ, agent_url=kwargs.pop("agent_url", DEAD), server_url=kwargs.pop("server_url", None),
                torch_probe=lambda: None, **kwargs)


@needs_compiler
def test_without_a_gpu_it_checks_what_it_can_and_says_what_it_could_not(tmp_path: Path) -> None:
    found = by_check(list(diagnose(cpu_node(tmp_path))))
    assert found["plugin build"].status is Status.ok and str(tmp_path) in found["plugin build"].detail
    assert found["plugin ABI"].status is Status.ok and "v7" in found["plugin ABI"].detail
    for check in ("GPUs", "plugin in NCCL", "hook NCCL path", "server", "clock"):
        assert found[check].status is Status.skip, check
    assert found["agent"].status is Status.warn and found["agent"].fix
    assert not [f for f in found.values() if f.status is Status.fail]


def test_a_missing_compiler_is_a_failure_with_the_fix(tmp_path: Path) -> None:
    node = cpu_node(tmp_path)
    node = Node(environ={**node.environ, "CC": "/nowhere/cc"}, agent_url=DEAD, server_url=None,
                torch_probe=lambda: None)
    found = by_check(list(diagnose(node)))
    assert found["plugin build"].status is Status.fail and "C compiler" in found["plugin build"].fix


def test_agent_server_and_clock_are_checked_over_http(tmp_path: Path, recording_server) -> None:
    answers = {"/healthz": {"status": "ok", "fabric_id": "cpu-test", "registered": True, "spool_depth": 0}}
    fake = recording_server(lambda path, body: (200, answers.get(path, {})))
    found = by_check(list(diagnose(cpu_node(tmp_path, agent_url=fake.url, server_url=fake.url))))
    assert found["agent"].status is Status.ok and "fabric cpu-test, registered" in found["agent"].detail
    assert found["server"].status is Status.ok and found["clock"].status is Status.ok
    unreachable = by_check(list(diagnose(cpu_node(tmp_path, server_url=DEAD))))
    assert unreachable["server"].status is Status.fail and unreachable["clock"].status is Status.skip


def test_a_skewed_clock_is_a_warning() -> None:
    response = httpx.Response(200, headers={"date": formatdate(time.time() + 60, usegmt=True)})
    finding = _clock(response, time.time())
    assert finding.status is Status.warn  # the Date header has a resolution of 1 s
    assert re.fullmatch(r"this node's clock is (59|60|61) s behind the server's", finding.detail)
    assert "chrony" in finding.fix


def nccl_style_log(library: Path, rules: Path) -> str:
    """What NCCL_DEBUG=INFO prints for this plugin: its own log lines, taken from the real plugin."""
    lines: list[str] = []
    with plugin_environment({"NCCL_TUNER_CONFIG_FILE": str(rules), "DYNAMICCL_TUNER_LOG_RULES": "1"}):
        with TunerLibrary(library, version=7).communicator(1, 1, log=lambda _l, _f, m: lines.append(m)):
            pass
    return "\n".join(f"node-a:4242:4250 [0] NCCL INFO {line}" for line in lines)


@needs_compiler
@pytest.mark.parametrize("loaded", [True, False], ids=["plugin loaded", "plugin not loaded"])
def test_on_a_gpu_node_the_probes_nccl_log_and_timings_are_read(tmp_path: Path, loaded: bool) -> None:
    def probe(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        assert env["NCCL_DEBUG"] == "INFO" and env["TORCH_NCCL_ENABLE_TIMING"] == "1"
        log = nccl_style_log(Path(env["NCCL_TUNER_PLUGIN"]), Path(env["NCCL_TUNER_CONFIG_FILE"])) if loaded else ""
        result = {"nccl_version": "2.28.9", "calls": 8, "hook": {},
                  "timed": {"allreduce": {"count": 8, "mean_us": 41.5}} if loaded else {}}
        return subprocess.CompletedProcess([], 0, stdout=json.dumps(result) + "\n", stderr=log)

    gpus = TorchInfo(gpu_names=("NVIDIA H200",), nccl_version="2.28.9")
    node = Node(environ={**os.environ, "XDG_CACHE_HOME": str(tmp_path)}, agent_url=DEAD, server_url=None,
                torch_probe=lambda: gpus, run_probe=probe)
    found = by_check(list(diagnose(node)))
    assert found["GPUs"].status is Status.ok and found["NCCL"].detail == "NCCL 2.28.9 (torch's)"
    expected = Status.ok if loaded else Status.fail
    assert found["plugin in NCCL"].status is expected and found["hook NCCL path"].status is expected
    if loaded:
        assert "rule sections known" in found["plugin in NCCL"].detail
        assert "8 of 8 all-reduces timed" in found["hook NCCL path"].detail


@needs_compiler
def test_the_command_prints_one_line_per_check(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", "--agent", DEAD],
                                env={"XDG_CACHE_HOME": str(tmp_path), "COLUMNS": "300"})
    lines = result.output.splitlines()
    assert result.exit_code == 0, result.output
    assert [line.split()[1] for line in lines[:2]] == ["dynamiccl", "torch"]
    assert any(line.startswith("ok   plugin ABI") for line in lines)

"""`dynamiccl launch` end to end: a fake agent / server on loopback, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamiccl.agent.launch.launcher import SITECUSTOMIZE_DIR
from dynamiccl.agent_api import JOB_ID_FILE

ANSWER = {
    "recommendations": [],
    "env": {"NCCL_ALGO": "allreduce:ring", "NCCL_PROTO": "allreduce:Simple"},
    "tuner_config": "# header\nallreduce,0,65535,tree,ll,-1,-1,-1\nallreduce,65536,1048576,ring,simple,-1,-1,-1\n",
}
# The child prints what it got: argv, the variables of interest, and the rule file's content.
PROBE = (
    "import json, os, sys\n"
    "keys = [k for k in os.environ if k.startswith(('NCCL_', 'DYNAMICCL_', 'TORCH_NCCL'))]\n"
    "env = {k: os.environ[k] for k in keys}\n"
    "rules = open(env['NCCL_TUNER_CONFIG_FILE']).read() if 'NCCL_TUNER_CONFIG_FILE' in env else None\n"
    "print(json.dumps({'argv': sys.argv[1:], 'env': env, 'rules': rules,"
    " 'pythonpath': os.environ.get('PYTHONPATH', '')}))\n"
    "sys.exit(int(os.environ.get('PROBE_EXIT', '0')))\n"
)


@pytest.fixture(scope="module")
def fake(recording_server):
    """Answers the agent's /local/v1/recommend and the server's /v1/recommend; remembers requests."""

    def answer(path: str, body: dict) -> tuple[int, dict]:
        extra = {"source": "server", "reason": "pinned for the job"} if path.startswith("/local") else {}
        return 200, {**ANSWER, **extra}

    return recording_server(answer)


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NCCL_", "DYNAMICCL_", "TORCH_NCCL", "SLURM_JOB_ID"))}
    return {**env, "COLUMNS": "200", **extra}


def launch(args: list[str], env: dict[str, str] | None = None) -> tuple[int, dict | None, str]:
    cmd = [sys.executable, "-m", "dynamiccl.cli.main", "launch", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or base_env(), timeout=60)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, proc.stderr


def probe(*argv: str) -> list[str]:
    return ["--", sys.executable, "-c", PROBE, *argv]


def test_sets_the_recommended_env_and_passes_arguments_through(fake) -> None:
    before = len(fake.requests)
    argv = ["--lr", "0.1", "a b", "--", "-x", "--job", "other"]
    rc, seen, err = launch(["--job", "llm-1", "--agent", fake.url, *probe(*argv)],
                           base_env(PROBE_EXIT="5"))
    assert rc == 5  # the command's exit status
    assert seen["argv"] == argv  # everything after the first `--`, untouched
    assert fake.requests[before:] == [("/local/v1/recommend", {"job_id": "llm-1", "contexts": None, "refresh": False}),
                                      ("/local/v1/jobs/llm-1/ended", {})]  # then: what reached the agent
    env = seen["env"]
    assert env["NCCL_ALGO"] == "allreduce:ring" and env["NCCL_PROTO"] == "allreduce:Simple"
    assert "NCCL_TUNER_CONFIG_FILE" not in env  # mode env: no rules
    assert env["DYNAMICCL_HOOK"] == "1" and env["DYNAMICCL_JOB_ID"] == "llm-1"
    assert env["DYNAMICCL_AGENT_URL"] == fake.url and env["TORCH_NCCL_ENABLE_TIMING"] == "1"
    assert seen["pythonpath"].split(os.pathsep)[0] == str(SITECUSTOMIZE_DIR)
    assert "server" in err and "NCCL_ALGO=allreduce:ring" in err and "2 tuner rules" in err


def test_a_job_that_reported_nothing_is_told_why_that_may_be(recording_server) -> None:
    def answer(path: str, body: dict) -> tuple[int, dict]:
        if path.endswith("/ended"):
            return 200, {"job_id": "quiet", "measurements": 0, "calls": 0, "contexts": 0}
        return 200, {**ANSWER, "source": "server", "reason": "pinned"}

    agent = recording_server(answer)
    rc, seen, err = launch(["--job", "quiet", "--agent", agent.url, *probe()])
    assert rc == 0 and ("/local/v1/jobs/quiet/ended", {}) in agent.requests
    assert "received no collective from this job" in err and "lowest rank" in err


def test_inspector_dumps_go_to_a_folder_named_after_the_job(fake, tmp_path: Path) -> None:
    rc, seen, err = launch(["--job", "llm/7", "--agent", fake.url, *probe()],
                           base_env(DYNAMICCL_INSPECTOR_DIR=str(tmp_path)))
    assert rc == 0 and seen["env"]["NCCL_INSPECTOR_DUMP_DIR"] == str(tmp_path / "llm_7")
    assert (tmp_path / "llm_7" / JOB_ID_FILE).read_text() == "llm/7", "the id the folder name could not hold"


def test_user_set_nccl_variables_win(fake) -> None:
    rc, seen, err = launch(["--job", "j", "--agent", fake.url, *probe()], base_env(NCCL_PROTO="LL"))
    assert rc == 0 and seen["env"]["NCCL_PROTO"] == "LL" and seen["env"]["NCCL_ALGO"] == "allreduce:ring"
    assert "NCCL_PROTO=LL kept: you set it" in err


def test_agent_down_runs_with_defaults_and_says_so() -> None:
    started = time.monotonic()
    rc, seen, err = launch(["--job", "j", "--agent", dead_url(), *probe()])
    assert rc == 0 and time.monotonic() - started < 30
    assert not any(k.startswith("NCCL_") for k in seen["env"])
    assert seen["env"]["DYNAMICCL_HOOK"] == "1"  # the profiler still runs
    assert "unreachable" in err and "NCCL default" in err and "default" in err


def test_plugin_mode_with_another_tuner_plugin_says_why_the_rules_do_not_fit_it_and_uses_env(fake) -> None:
    rc, seen, err = launch(["--job", "j", "--agent", fake.url, "--mode", "plugin", *probe()],
                           base_env(DYNAMICCL_TUNER_PLUGIN="/opt/libnccl-tuner-example.so"))
    assert rc == 0
    assert "NCCL_TUNER_PLUGIN" not in seen["env"] and seen["rules"] is None
    assert seen["env"]["NCCL_ALGO"] == "allreduce:ring"
    assert "not DynamICCL's tuner plugin" in err and "ONE channel" in err and "env mode instead" in err


def test_plugin_mode_builds_and_loads_dynamiccls_own_plugin(fake, tmp_path: Path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    args = ["--job", "j", "--agent", fake.url, "--mode", "plugin", *probe()]
    rc, seen, err = launch(args, base_env(XDG_CACHE_HOME=str(tmp_path)))
    plugin = Path(seen["env"]["NCCL_TUNER_PLUGIN"])
    assert rc == 0 and plugin.parent == tmp_path / "dynamiccl" / "plugin" and plugin.is_file()
    assert seen["rules"] == ANSWER["tuner_config"] and "DynamICCL's tuner plugin built" in err
    assert "NCCL_ALGO" not in seen["env"], "the rules alone: an env would restrict what they leave to NCCL"
    assert not Path(seen["env"]["NCCL_TUNER_CONFIG_FILE"]).exists()  # removed after the job
    assert "2 tuner rules written" in err
    rc, seen, err = launch(args, base_env(XDG_CACHE_HOME=str(tmp_path)))
    assert seen["env"]["NCCL_TUNER_PLUGIN"] == str(plugin) and "DynamICCL's tuner plugin up to date" in err


def test_plugin_mode_sets_the_tuner_plugin_explicitly_and_says_which_tuner_it_displaces(fake, tmp_path: Path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    args = ["--job", "j", "--agent", fake.url, "--mode", "plugin", *probe()]
    rc, seen, err = launch(args, base_env(XDG_CACHE_HOME=str(tmp_path), NCCL_TUNER_PLUGIN="/opt/mine/libtuner.so",
                                          NCCL_TUNER_CONFIG_FILE="/opt/mine/tuner.conf"))
    assert rc == 0 and Path(seen["env"]["NCCL_TUNER_PLUGIN"]).parent == tmp_path / "dynamiccl" / "plugin"
    assert seen["rules"] == ANSWER["tuner_config"]
    assert "displaces your NCCL_TUNER_PLUGIN=/opt/mine/libtuner.so" in err
    assert "NCCL_TUNER_CONFIG_FILE=/opt/mine/tuner.conf replaced" in err
    # On AWS, aws-ofi-nccl loads its own tuner whenever NCCL_TUNER_PLUGIN is unset.
    ofi = tmp_path / "ofi" / "lib"
    ofi.mkdir(parents=True)
    (ofi / "libnccl-net-ofi.so").touch()
    rc, seen, err = launch(args, base_env(XDG_CACHE_HOME=str(tmp_path), LD_LIBRARY_PATH=str(ofi)))
    assert rc == 0 and "NCCL_TUNER_PLUGIN" in seen["env"] and "displaces aws-ofi-nccl's tuner" in err


def test_env_mode_says_another_tuner_plugin_may_override_the_env(fake) -> None:
    rc, seen, err = launch(["--job", "j", "--agent", fake.url, *probe()],
                           base_env(NCCL_TUNER_PLUGIN="/opt/mine/libtuner.so"))
    assert rc == 0 and seen["env"]["NCCL_ALGO"] == "allreduce:ring"
    assert seen["env"]["NCCL_TUNER_PLUGIN"] == "/opt/mine/libtuner.so", "env mode leaves the user's tuner alone"
    assert "your NCCL_TUNER_PLUGIN=/opt/mine/libtuner.so will be loaded" in err and "may override this env" in err


def test_plugin_mode_without_a_compiler_falls_back_to_env(fake, tmp_path: Path) -> None:
    rc, seen, err = launch(["--job", "j", "--agent", fake.url, "--mode", "plugin", *probe()],
                           base_env(CC="/nowhere/cc", XDG_CACHE_HOME=str(tmp_path)))
    assert rc == 0 and "NCCL_TUNER_PLUGIN" not in seen["env"] and seen["env"]["NCCL_ALGO"] == "allreduce:ring"
    assert "cannot build DynamICCL's tuner plugin: $CC='/nowhere/cc'" in err and "falling back to env mode" in err


def test_mode_off_only_turns_the_profiler_on(fake) -> None:
    before = len(fake.requests)
    rc, seen, err = launch(["--job", "j", "--agent", fake.url, "--mode", "off", *probe()])
    assert rc == 0 and [path for path, _ in fake.requests[before:]] == ["/local/v1/jobs/j/ended"]  # no recommend
    assert not any(k.startswith("NCCL_") for k in seen["env"]) and seen["env"]["DYNAMICCL_HOOK"] == "1"


def test_server_mode_asks_the_server_pinned_by_job(fake) -> None:
    rc, seen, err = launch(["--job", "j9", "--server", fake.url, "--fabric-id", "dgx-a", *probe()])
    assert rc == 0 and seen["env"]["NCCL_ALGO"] == "allreduce:ring"
    path, body = fake.requests[-1]
    assert path == "/v1/recommend" and body["job_id"] == "j9" and body["fabric_id"] == "dgx-a"


def test_signals_are_forwarded_and_the_status_returned(fake, tmp_path: Path) -> None:
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    cmd = [sys.executable, "-m", "dynamiccl.cli.main", "launch", "--mode", "off", "--", sys.executable, "-c", child]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env())
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 42


def test_zero_code_activation_installs_the_hook_in_an_unmodified_script(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    script = tmp_path / "train.py"
    script.write_text(
        "import torch\n"
        "from dynamiccl.agent import hook\n"
        "p = hook.current()\n"
        "kernels = torch._C._dispatch_dump('c10d::allreduce_')\n"
        "print(p is not None and p.job_id == 'zc' and 'ADInplaceOrView: registered' in kernels)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dynamiccl.cli.main", "launch", "--job", "zc", "--mode", "off",
         "--agent", dead_url(), "--", sys.executable, str(script)],
        capture_output=True, text=True, env=base_env(), timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_sitecustomize_is_a_no_op_unless_enabled_and_never_breaks_the_script(tmp_path: Path) -> None:
    broken = tmp_path / "shadow" / "dynamiccl"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    chained = tmp_path / "chained"
    chained.mkdir()
    (chained / "sitecustomize.py").write_text("import builtins; builtins.CHAINED = True\n")
    path = os.pathsep.join([str(SITECUSTOMIZE_DIR), str(tmp_path / "shadow"), str(chained)])
    script = "import builtins, sys; print(getattr(builtins, 'CHAINED', False), 'torch' in sys.modules)"
    for hook_on in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env=base_env(PYTHONPATH=path, DYNAMICCL_HOOK=hook_on))
        assert proc.returncode == 0 and proc.stdout.split() == ["True", "False"]  # chained, torch untouched
        assert ("simulated broken install" in proc.stderr) is (hook_on == "1")
        assert proc.stderr.count("dynamiccl hook") == (1 if hook_on == "1" else 0)


def test_plugin_mode_hands_its_rules_to_the_agent_for_online_tuning_and_runs_on_the_agents_file(
        recording_server, tmp_path: Path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    kept = tmp_path / "agent-rules" / "dynamiccl-j5-1.rules"

    def answer(path: str, body: dict) -> tuple[int, dict]:
        if path == "/local/v1/plugin/register":  # the agent keeps the rules in a file of its own
            kept.parent.mkdir(exist_ok=True)
            kept.write_text(body["rules"])
            return 201, {"rules_file": str(kept), "next_round": 0}
        if path == "/local/v1/plugin/unregister":
            kept.unlink()
            return 200, {"unregistered": True}
        return 200, {**ANSWER, "source": "server", "reason": "pinned"}

    agent = recording_server(answer)
    rc, seen, err = launch(["--job", "j5", "--agent", agent.url, "--mode", "plugin", *probe()],
                           base_env(XDG_CACHE_HOME=str(tmp_path), DYNAMICCL_ROUND_CALLS="500"))
    assert rc == 0 and seen["env"]["DYNAMICCL_ROUND_CALLS"] == "500"
    assert seen["env"]["NCCL_TUNER_CONFIG_FILE"] == str(kept) and seen["rules"] == ANSWER["tuner_config"]
    assert [path for path, _ in agent.requests] == [
        "/local/v1/recommend", "/local/v1/plugin/register", "/local/v1/plugin/unregister", "/local/v1/jobs/j5/ended"]
    assert agent.posted("/local/v1/plugin/register") == [
        {"job_id": "j5", "rules": ANSWER["tuner_config"], "round_calls": 500}]
    assert agent.posted("/local/v1/plugin/unregister") == [{"rules_file": str(kept)}]
    assert "online tuning on: a rules section every 500 calls" in err and f"written to {kept}" in err
    named = re.findall(r"(/[^\s=;]*dynamiccl-j5-[^\s;]*\.rules)", err)
    assert named and set(named) == {str(kept)}, "the launch's own file is gone, and not named"

"""promtool on the shipped Prometheus files: the config and its rules load, and every alert fires
on the situation it names and stays quiet on its healthy counterpart (alerts_test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def promtool(bin_dir: Path, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([str(bin_dir / "promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          check=False)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_prometheus_config_is_valid_and_loads_the_alert_rules(prometheus_bin):
    out = promtool(prometheus_bin, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "1 rule files found" in out


def test_alert_rules_are_valid(prometheus_bin):
    out = promtool(prometheus_bin, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert "SUCCESS" in out


def test_alerts_fire_on_what_they_name_and_only_then(prometheus_bin):
    here = Path(__file__).parent
    promtool(prometheus_bin, "test", "rules", "alerts_test.yml", cwd=here)

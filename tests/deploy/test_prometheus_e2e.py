"""A real Prometheus scraping a real server and agent while `dynamiccl sim-job` runs through them:
the expected series arrive with the right values, the shipped alert rules evaluate, and every
PromQL expression of the dashboards and alerts parses in Prometheus and names only metrics the
server and agent export."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from polling import wait_until

from dynamiccl.workloads.services import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
FABRIC_ID = "sim-h100-ib-2n"
TUNE_ROUNDS, RUN_ROUNDS, COUNT, CONTEXTS = 6, 3, 20, 15  # CONTEXTS: dynamiccl.sim.feeder.job_contexts
EXPECTED_CALLS = (TUNE_ROUNDS + RUN_ROUNDS) * CONTEXTS * COUNT
# Grafana's variables, replaced by values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$fabric": ".*", "$collective": ".*", "$instance": ".*"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "inf", "nan"}
# Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up"}


@dataclass
class Stack:
    server: str
    agent: str
    prometheus: str

    def query(self, expr: str) -> dict:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        return response.json()

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None


def prometheus_config(server: str, agent: str, alerts: Path) -> dict:
    def target(url: str) -> list[dict]:
        return [{"targets": [url.removeprefix("http://")]}]
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(alerts)],
        "scrape_configs": [{"job_name": "dynamiccl-server", "static_configs": target(server)},
                           {"job_name": "dynamiccl-agent", "static_configs": target(agent)}],
    }


@pytest.fixture(scope="module")
def stack(module_processes, prometheus_bin) -> Iterator[Stack]:
    procs = module_processes
    server = procs.server("server", f"sqlite:///{procs.workdir / 'server.db'}")
    agent = procs.agent("agent", server, FABRIC_ID)
    config = procs.workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(server, agent, DEPLOY_ALERTS)))
    port = free_port()
    procs.start("prometheus", [str(prometheus_bin / "prometheus"), f"--config.file={config}",
                               f"--storage.tsdb.path={procs.workdir / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"])
    prometheus = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{prometheus}/-/ready").status_code == 200, 30, "Prometheus ready")
    job = procs.start("sim-job", [sys.executable, "-m", "dynamiccl.cli.main", "sim-job", "--server", server,
                                  "--agent", agent, "--fabric-id", FABRIC_ID, "--tune-rounds", str(TUNE_ROUNDS),
                                  "--run-rounds", str(RUN_ROUNDS), "--count", str(COUNT), "--interval", "0.1"])
    assert job.wait(timeout=120) == 0, procs.log("sim-job")
    yield Stack(server, agent, prometheus)


def test_prometheus_scrapes_both_and_sees_every_call_of_the_simulated_job(stack):
    for job in ("dynamiccl-server", "dynamiccl-agent"):
        wait_until(lambda job=job: stack.value(f'up{{job="{job}"}}') == 1, 20, f"{job} up")
    # Every call the job ran, counted by the agent and, once sent, by the server.
    wait_until(lambda: stack.value("sum(dynamiccl_agent_collective_calls_total)") == EXPECTED_CALLS,
                     20, f"the agent's {EXPECTED_CALLS} calls in Prometheus")
    wait_until(lambda: stack.value("sum(dynamiccl_measured_calls_total)") == EXPECTED_CALLS,
                     20, f"the server's {EXPECTED_CALLS} calls in Prometheus")
    wait_until(lambda: stack.value("dynamiccl_agent_spool_depth_batches") == 0, 20, "spool drained")
    assert stack.value(f'dynamiccl_contexts{{fabric="{FABRIC_ID}"}}') == CONTEXTS
    speedup = stack.value(f'dynamiccl_predicted_speedup{{fabric="{FABRIC_ID}"}}')
    assert speedup is not None and speedup >= 1.0  # never a recommendation predicted slower than NCCL's
    tuning_calls = TUNE_ROUNDS * CONTEXTS * COUNT
    by_kind = {r["metric"]["config"]: float(r["value"][1]) for r in stack.query(
        "sum by (config) (dynamiccl_measured_calls_total)")["data"]["result"]}
    assert by_kind.get("default", 0) + by_kind.get("suggested", 0) >= tuning_calls  # every tuning round
    assert sum(by_kind.values()) == EXPECTED_CALLS
    # Every batch the agent counts as sent, the server counts as accepted (scrapes of the two may lag).
    def sent_were_accepted() -> bool:
        sent = stack.value("dynamiccl_agent_batches_sent_total")
        return sent is not None and sent > 0 and sent == stack.value('sum(dynamiccl_batches_total{result="accepted"})')
    wait_until(sent_were_accepted, 10, "batches sent == batches accepted")


def test_the_shipped_alert_rules_load_and_evaluate(stack):
    def rules() -> list[dict]:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules").json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]
    shipped = [rule for group in yaml.safe_load(DEPLOY_ALERTS.read_text())["groups"] for rule in group["rules"]]
    wait_until(lambda: len(rules()) == len(shipped) and all(
        not r["lastEvaluation"].startswith("0001") for r in rules()), 20, "every rule evaluated")
    assert {r["name"] for r in rules()} == {r["alert"] for r in shipped}
    assert all(r["health"] == "ok" for r in rules()), [r for r in rules() if r["health"] != "ok"]
    # Nothing is wrong with this stack: once both targets have been scraped, no alert may be pending
    # or firing. (Evaluations before the first scrape see `up` absent, so wait for a clean one; and
    # whether a tuned config measured slower than the default here depends on the simulated noise.)
    def active() -> list[str]:
        return [r["name"] for r in rules() if r["state"] != "inactive" and r["name"] != "DynamicclTunedSlowerThanDefault"]
    wait_until(lambda: active() == [], 20, "no alert pending or firing")



def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of every dashboard."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']}", target["expr"]))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
                assert selector, f"{path.name}: variable {variable['name']} is not label_values(...)"
                found.append((f"{path.name}: variable {variable['name']}", selector.group(1)))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load(DEPLOY_ALERTS.read_text())["groups"]
    return [(f"alerts.yml: {rule['alert']}", rule["expr"]) for group in groups for rule in group["rules"]]


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    aggregations, keywords, label names (in braces or grouping clauses), durations or numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\boffset\s+\w+", " ", expr)
    expr = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end():].lstrip().startswith("(") or match.group(0).lower() in KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def exported_names(*metrics_texts: str) -> set[str]:
    """Every series name a /metrics text can produce, including those of label sets not used yet."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "info": ("_info",)}
    names = set()
    for text in metrics_texts:
        for family in text_string_to_metric_families(text):
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    return names


def test_the_metric_name_extractor_finds_names_and_only_names():
    expr = ('histogram_quantile(0.99, sum by (route, le) (rate(a_seconds_bucket{route=~"/v1.*",le!="1e3"}[5m])))'
            ' / ignoring(x) group_left(y) b_total offset 1h > 1.5e-3 and on() absent(up{job="j"} == 1)'
            ' unless time() - c > bool 0')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "up", "c"}


def test_every_metric_in_dashboards_and_alerts_is_exported_by_server_or_agent(stack):
    exported = exported_names(httpx.get(f"{stack.server}/metrics").text, httpx.get(f"{stack.agent}/metrics").text)
    expressions = dashboard_expressions() + alert_expressions()
    used: dict[str, list[str]] = {}
    for where, expr in expressions:
        for name in metric_names(substitute(expr)):
            used.setdefault(name, []).append(where)
    assert len(DASHBOARDS) == 4 and len(used) >= 20, sorted(used)
    unknown = {name: where for name, where in used.items() if name not in exported | PROMETHEUS_SERIES}
    assert unknown == {}, f"metrics used but not exported: {unknown}"


def test_every_dashboard_and_alert_expression_runs_in_prometheus(stack):
    failures = {}
    for where, expr in dashboard_expressions() + alert_expressions():
        answer = stack.query(substitute(expr))
        if answer["status"] != "success":
            failures[where] = answer.get("error")
    assert failures == {}


@pytest.mark.parametrize("where", [
    "dynamiccl-fleet.json: Contexts learned per fabric",
    "dynamiccl-fleet.json: Predicted speedup per fabric",
    "dynamiccl-fleet.json: Calls measured by config kind",
    "dynamiccl-collectives.json: Mean latency per call: default vs tuned",
    "dynamiccl-collectives.json: Bus bandwidth: default vs tuned",
    "dynamiccl-collectives.json: Agent-reported latency p50 (all configs)",
    "dynamiccl-agents.json: Spool depth",
    "dynamiccl-agents.json: Staleness: time since the last accepted batch",
    "dynamiccl-agents.json: Batches sent and send failures",
    "dynamiccl-server.json: Requests by route and status",
    "dynamiccl-server.json: Latency p99 by route",
    "dynamiccl-server.json: Learner refit duration",
])
def test_the_main_panels_show_data_for_the_simulated_job(stack, where):
    expressions = [expr for place, expr in dashboard_expressions() if place == where]
    assert expressions, f"no panel {where}"
    wait_until(lambda: stack.query(substitute(expressions[0]))["data"]["result"], 20, f"data in {where}")


def test_sim_job_refuses_an_agent_whose_fabric_is_not_its_preset(stack):
    done = subprocess.run([sys.executable, "-m", "dynamiccl.cli.main", "sim-job", "--server", stack.server,
                           "--agent", stack.agent, "--fabric-id", FABRIC_ID, "--preset", "l40s-roce-2n"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "start the agent with the preset's hardware as overrides" in done.stderr

"""The docker compose file, the image and the Kubernetes manifests: valid, and consistent with
each other (scrape targets, proxy upstreams, job labels, secrets, ports, the simulated fabric)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dynamiccl.schemas import Fabric
from dynamiccl.server.auth import load_tokens
from dynamiccl.sim import get_preset

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "k8s"
SERVER_PORT, AGENT_METRICS_PORT = 8000, 7462
AGENT_SOCKET = "unix:/run/dynamiccl/agent.sock"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def option(argv: list[str], name: str) -> str:
    """The value of `--name value` or `--name=value` in a command line."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def server_services(services: dict) -> list[str]:
    return sorted(name for name, s in services.items() if s.get("build", {}).get("target") == "server")


def alert_jobs() -> set[str]:
    return set(re.findall(r'job="([^"]+)"', (DEPLOY / "prometheus" / "alerts.yml").read_text()))


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0,
    reason="docker compose is not available",
)
def test_docker_compose_config_is_valid():
    done = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_compose_runs_the_whole_stack_from_files_that_exist():
    services = compose()["services"]
    assert {"postgres", "server-1", "server-2", "proxy", "agent", "sim-job", "prometheus", "grafana"} <= set(services)
    assert server_services(services) == ["server-1", "server-2"]
    for service in services.values():
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{source} is mounted but missing"


def test_prometheus_and_the_proxy_reach_every_replica_and_the_agent():
    services = compose()["services"]
    replicas = {f"{name}:{SERVER_PORT}" for name in server_services(services)}
    scrape = {job["job_name"]: {t for c in job["static_configs"] for t in c["targets"]}
              for job in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    assert scrape == {"dynamiccl-server": replicas, "dynamiccl-agent": {f"agent:{AGENT_METRICS_PORT}"}}
    assert set(scrape) >= alert_jobs()
    upstreams = set(re.findall(r"^\s*server\s+(\S+?:\d+)", (DEPLOY / "nginx" / "nginx.conf").read_text(), re.MULTILINE))
    assert upstreams == replicas
    agent = services["agent"]["command"]
    assert option(agent, "--listen") == AGENT_SOCKET, "the local API is for the node's jobs only"
    assert option(agent, "--metrics-listen") == f"0.0.0.0:{AGENT_METRICS_PORT}"
    assert option(agent, "--server") == option(services["sim-job"]["command"], "--server") == f"http://proxy:{SERVER_PORT}"


def test_the_agent_has_a_token_of_its_own():
    services = compose()["services"]
    tokens = load_tokens(env={"DYNAMICCL_TOKENS": expand(services["server-1"]["environment"]["DYNAMICCL_TOKENS"])})
    agent_token = expand(services["agent"]["environment"]["DYNAMICCL_TOKEN"])
    job_token = expand(services["sim-job"]["environment"]["DYNAMICCL_TOKEN"])
    names = {name for name, token in tokens.items() if token.secret == agent_token}
    assert len(names) == 1 and agent_token != job_token, "the agent is a source of its own"


def expand(value: str) -> str:
    """A compose value with each ${VAR:-default} at its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_the_simulated_job_and_the_agent_agree_on_the_fabric():
    services = compose()["services"]
    agent, job = services["agent"]["command"], services["sim-job"]["command"]
    assert option(agent, "--fabric-id") == option(job, "--fabric-id")
    assert option(job, "--agent") == AGENT_SOCKET
    shared = {v.split(":")[0] for v in services["agent"]["volumes"]} & {v.split(":")[0] for v in services["sim-job"]["volumes"]}
    assert shared == {"agent-socket"}, "the job reaches the agent through the socket's volume alone"
    overrides = Fabric(gpu=option(agent, "--gpu"), gpus_per_node=int(option(agent, "--gpus-per-node")),
                       intra_node=option(agent, "--intra-node"), inter_node=option(agent, "--inter-node"),
                       nics_per_node=int(option(agent, "--nics-per-node")),
                       nccl_version=option(agent, "--nccl-version"))
    assert overrides == get_preset(option(job, "--preset")).fabric


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards():
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("."))
    provisioning = DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((provisioning / "dashboards" / "dynamiccl.yml").read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose()["services"]["prometheus"]["ports"]


def test_images_run_as_a_user_with_a_healthcheck_and_no_torch():
    stages = {m.group(1): m.group(2) for m in re.finditer(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)",
                                                          DOCKERFILE.read_text(), re.MULTILINE | re.DOTALL)}
    for target, port, path in (("server", SERVER_PORT, "healthz"), ("agent", AGENT_METRICS_PORT, "metrics")):
        body = stages[target]
        assert re.search(r"^USER dynamiccl$", body, re.MULTILINE), f"{target} runs as root"
        assert f"127.0.0.1:{port}/{path}" in body and "HEALTHCHECK" in body
        assert f"EXPOSE {port}" in body
    assert "torch" not in "".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("RUN"))


def k8s_objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not available")
def test_kustomize_renders_every_manifest_into_the_namespace():
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == set(k8s_objects())
    assert all(d["metadata"].get("namespace") == "dynamiccl" for d in rendered if d["kind"] != "Namespace")


def container(objects: dict, kind: str, name: str) -> dict:
    containers = objects[(kind, name)]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def secret_refs(spec: dict) -> set[str]:
    return {env["valueFrom"]["secretKeyRef"]["key"] for env in spec.get("env", [])
            if "secretKeyRef" in env.get("valueFrom", {})}


def test_server_deployment_is_replicated_probed_bounded_and_fed_from_the_secret():
    objects = k8s_objects()
    deployment = objects[("Deployment", "dynamiccl-server")]
    server = container(objects, "Deployment", "dynamiccl-server")
    assert deployment["spec"]["replicas"] >= 2
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/healthz"
    assert server["resources"]["requests"] and server["resources"]["limits"]
    secret = objects[("Secret", "dynamiccl")]["stringData"]
    assert secret_refs(server) == {"database-url"} and "database-url" in secret
    tokens = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tokens")
    assert tokens["secret"]["secretName"] == "dynamiccl" and "tokens" in secret
    assert {e["name"]: e.get("value") for e in server["env"]}["DYNAMICCL_TOKENS_FILE"] == "/etc/dynamiccl/tokens"
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    service = objects[("Service", "dynamiccl-server")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert "dynamiccl-server" in alert_jobs()  # a ServiceMonitor's job label is the Service's name
    monitor = objects[("ServiceMonitor", "dynamiccl-server")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def test_agent_daemonset_runs_on_gpu_nodes_with_node_name_spool_and_metrics():
    objects = k8s_objects()
    pod = objects[("DaemonSet", "dynamiccl-agent")]["spec"]["template"]
    agent = container(objects, "DaemonSet", "dynamiccl-agent")
    assert pod["spec"]["nodeSelector"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert secret_refs(agent) <= set(objects[("Secret", "dynamiccl")]["stringData"])
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["spec"]["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert set(host_paths) == {"spool", "inspector", "socket"} <= set(mounts)
    assert mounts["spool"]["mountPath"] == env["DYNAMICCL_SPOOL"]["value"]
    assert mounts["inspector"]["mountPath"] == option(agent["args"], "--inspector-dir")
    assert option(agent["args"], "--listen") == f"unix:{mounts['socket']['mountPath']}/agent.sock" == AGENT_SOCKET
    assert option(agent["args"], "--metrics-listen") == f"0.0.0.0:{AGENT_METRICS_PORT}"
    assert option(agent["args"], "--rules-dir").startswith(mounts["socket"]["mountPath"] + "/"), "shared with jobs"
    assert option(agent["args"], "--server") == f"http://dynamiccl-server:{SERVER_PORT}"
    tokens = next(v for v in pod["spec"]["volumes"] if v["name"] == "agent-tokens")["secret"]["secretName"]
    assert (option(agent["args"], "--token-file")
            == f"{mounts['agent-tokens']['mountPath']}/$(NODE_NAME)"), "each node presents its own token"
    assert ("Secret", tokens) in objects and "DYNAMICCL_TOKEN" not in env, "no token shared by the fleet"
    node_tokens = objects[("Secret", tokens)]["stringData"]
    server_tokens = objects[("Secret", "dynamiccl")]["stringData"]["tokens"]
    assert all(f"{node}:{token}:agent" in server_tokens for node, token in node_tokens.items())
    assert all("hostPort" not in p for p in agent["ports"]), "nothing of the agent's on the node's network"
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports["metrics"] == AGENT_METRICS_PORT
    for probe in ("readinessProbe", "livenessProbe"):
        assert agent[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    monitor = objects[("PodMonitor", "dynamiccl-agent")]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} == {"metrics"}
    assert pod["metadata"]["labels"][monitor["jobLabel"]] == "dynamiccl-agent"
    assert "dynamiccl-agent" in alert_jobs()


def test_dashboards_define_every_variable_they_use_and_keep_ids_unique():
    uids = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        uids.append(dashboard["uid"])
        defined = {v["name"] for v in dashboard["templating"]["list"]}
        assert "datasource" in defined, path.name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dashboard["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
            for target in panel["targets"]:
                used = set(re.findall(r"\$(?!__)(\w+)", target["expr"]))
                assert used <= defined, f"{path.name}: {panel['title']} uses undefined {used - defined}"
    assert len(uids) == len(set(uids)) == 4

"""The agent's local API against a fake server: ingest, bad input, recommend fallbacks, metrics."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from polling import wait_until

from dynamiccl.agent.daemon.agent import Agent, AgentConfig
from dynamiccl.agent.daemon.app import create_app
from dynamiccl.schemas import Fabric

FABRIC = Fabric(gpu="cpu", gpus_per_node=1, intra_node="pcie", inter_node="none", nics_per_node=0)


@pytest.fixture
def make_agent(tmp_path, fake_server):
    started: list[TestClient] = []

    def make(spool_dir=None, **kwargs) -> tuple[Agent, TestClient]:
        config = AgentConfig(server="http://fake", fabric_id="cpu-test", fabric=FABRIC,
                             spool_dir=spool_dir or tmp_path / "spool", window_s=0.1, max_backoff_s=0.1, **kwargs)
        agent = Agent(config, transport=fake_server.transport)
        client = TestClient(create_app(agent))
        client.__enter__()
        started.append(client)
        return agent, client

    yield make
    for client in started:
        client.__exit__(None, None, None)


def body(make_measurement, n: int = 3, job_id: str | None = "job-1") -> dict:
    return {"job_id": job_id, "measurements": [
        make_measurement(nbytes=1000 + i, job_id=None).model_dump(mode="json") for i in range(n)]}


def test_measurements_reach_the_server(make_agent, fake_server, make_measurement):
    agent, client = make_agent()
    response = client.post("/local/v1/measurements", json=body(make_measurement, 5))
    assert response.status_code == 202 and response.json() == {"accepted": 5}
    wait_until(lambda: fake_server.measurements == 5)
    assert fake_server.fabrics["cpu-test"]["gpu"] == "cpu"
    assert client.get("/healthz").json()["registered"] is True
    metrics = client.get("/metrics").text
    for name in ("dynamiccl_agent_collective_latency_seconds_bucket", "dynamiccl_agent_collective_bytes_total",
                 "dynamiccl_agent_collective_calls_total", "dynamiccl_agent_spool_depth_batches",
                 "dynamiccl_agent_spool_dropped_batches_total", "dynamiccl_agent_send_failures_total",
                 "dynamiccl_agent_last_send_success_timestamp_seconds",
                 "dynamiccl_agent_measurements_received_total", "dynamiccl_agent_bad_requests_total"):
        assert name in metrics
    assert 'size_class="<=64KiB"' in metrics and 'dynamiccl_agent_collective_calls_total{collective="allreduce"} 5.0' in metrics


@pytest.mark.parametrize("payload, field", [
    ({"measurements": [{"context": {"collective": "allreduce", "nbytes": 1, "nranks": 1, "nnodes": 2},
                        "config": {}, "latency_us": 1.0, "source": "torch"}]}, "context"),
    ({"measurements": [{"context": {"collective": "allreduce", "nbytes": 1, "nranks": 1, "nnodes": 1},
                        "config": {}, "latency_us": -1.0, "source": "torch"}]}, "latency_us"),
    ({"measurements": "nope"}, "measurements"),
    ({"job_id": ""}, "job_id"),
])
def test_bad_input_is_a_422_naming_the_field(make_agent, fake_server, make_measurement, payload, field):
    agent, client = make_agent()
    response = client.post("/local/v1/measurements", json=payload)
    assert response.status_code == 422
    assert any(field in map(str, error["loc"]) for error in response.json()["detail"])
    assert client.post("/local/v1/measurements", content=b"{not json").status_code == 422
    assert client.post("/local/v1/measurements", json=body(make_measurement)).status_code == 202
    assert "dynamiccl_agent_bad_requests_total 2.0" in client.get("/metrics").text
    wait_until(lambda: fake_server.measurements == 3)


def test_a_config_the_fabric_cannot_run_is_refused_alone(make_agent, fake_server, make_measurement):
    """NVLS on a PCIe node among ten measurements: a 422 naming it, and the nine others delivered."""
    agent, client = make_agent()
    payload = body(make_measurement, 10)
    payload["measurements"][6]["config"] = {"algo": "nvls", "proto": "simple"}
    response = client.post("/local/v1/measurements", json=payload)
    assert response.status_code == 422 and response.json()["accepted"] == 9
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "measurements", 6, "config"] and "nvls" in error["msg"]
    wait_until(lambda: fake_server.measurements == 9)
    assert 'dynamiccl_agent_measurements_refused_total{where="agent"} 1.0' in client.get("/metrics").text


def test_a_launch_learns_what_the_agent_received_from_its_job(make_agent, make_measurement):
    agent, client = make_agent()
    client.post("/local/v1/measurements", json=body(make_measurement, 3, job_id="job/7"))
    ended = client.post("/local/v1/jobs/job%2F7/ended").json()
    assert ended == {"job_id": "job/7", "measurements": 3, "calls": 3, "contexts": 3}
    silent = client.post("/local/v1/jobs/quiet/ended").json()
    assert silent["measurements"] == 0 and silent["calls"] == 0
    metrics = client.get("/metrics").text
    assert 'dynamiccl_agent_jobs_ended_total{reported="yes"} 1.0' in metrics
    assert 'dynamiccl_agent_jobs_ended_total{reported="no"} 1.0' in metrics


def test_too_many_measurements_are_refused(make_agent, make_measurement):
    agent, client = make_agent()
    one = make_measurement().model_dump(mode="json")
    response = client.post("/local/v1/measurements", json={"measurements": [one] * 10_001})
    assert response.status_code == 422 and "measurements" in response.json()["detail"][0]["loc"]


def test_starts_without_the_server_and_delivers_later(make_agent, fake_server, make_measurement):
    fake_server.down = True
    agent, client = make_agent()
    assert client.post("/local/v1/measurements", json=body(make_measurement, 4)).status_code == 202
    wait_until(lambda: agent.spool.depth() >= 1)
    assert client.get("/healthz").json()["registered"] is False
    fake_server.down = False
    wait_until(lambda: fake_server.measurements == 4 and agent.spool.depth() == 0)
    assert "cpu-test" in fake_server.fabrics


def test_recommend_server_then_cache_then_default(make_agent, fake_server, tmp_path, make_measurement):
    agent, client = make_agent()
    contexts = [{"collective": "allreduce", "nbytes": 1 << 20, "nranks": 8, "nnodes": 1, "weight": 3}]
    wait_until(lambda: "cpu-test" in fake_server.fabrics)
    first = client.post("/local/v1/recommend", json={"job_id": "job-1", "contexts": contexts}).json()
    assert first["source"] == "server" and first["env"]["NCCL_ALGO"] == "allreduce:ring"
    fake_server.down = True
    cached = client.post("/local/v1/recommend", json={"job_id": "job-1", "contexts": contexts}).json()
    assert cached["source"] == "cache" and cached["env"] == first["env"] and "unavailable" in cached["reason"]
    other = client.post("/local/v1/recommend", json={"job_id": "job-2", "contexts": contexts}).json()
    assert other["source"] == "default" and other["env"] == {} and other["tuner_config"] == ""
    # The cache is on disk: a restarted agent still serves job-1's pinned answer.
    client.__exit__(None, None, None)
    agent, client = make_agent()
    again = client.post("/local/v1/recommend", json={"job_id": "job-1", "contexts": contexts}).json()
    assert again["source"] == "cache" and again["env"] == first["env"]


def test_recommend_uses_the_recorded_workload(make_agent, fake_server, make_measurement):
    agent, client = make_agent()
    wait_until(lambda: "cpu-test" in fake_server.fabrics)
    nothing = client.post("/local/v1/recommend", json={"job_id": "job-1"}).json()
    assert nothing["source"] == "default" and "no workload" in nothing["reason"]
    client.post("/local/v1/measurements", json=body(make_measurement, 7))
    answer = client.post("/local/v1/recommend", json={"job_id": "job-1"}).json()
    assert answer["source"] == "server" and answer["env"]["X_CONTEXTS"] == "7"


def test_recommend_bad_input(make_agent):
    agent, client = make_agent()
    assert client.post("/local/v1/recommend", json={"contexts": None}).status_code == 422
    response = client.post("/local/v1/recommend", json={"job_id": "j", "contexts": []})
    assert response.status_code == 422 and "contexts" in response.json()["detail"][0]["loc"]


def test_inspector_dumps_flow_to_the_server(make_agent, fake_server, tmp_path):
    dumps = tmp_path / "inspector"
    dumps.mkdir()
    agent, client = make_agent(inspector_dir=dumps, inspector_interval_s=0.05, inspector_job_id="job-i")
    record = {"header": {"id": "0x1", "rank": 0, "n_ranks": 4, "nnodes": 1},
              "metadata": {"dump_timestamp_us": 1748030377748202, "hostname": "n", "pid": 1},
              "coll_perf": {"coll": "ReduceScatter", "coll_sn": 1, "coll_msg_size_bytes": 1 << 20,
                            "coll_exec_time_us": 80, "coll_timing_source": "kernel_gpu",
                            "coll_algobw_gbs": 1.0, "coll_busbw_gbs": 1.0}}
    cpu_timed = {**record, "coll_perf": {**record["coll_perf"], "coll_timing_source": "collective_cpu"}}
    (dumps / "rank0.log").write_text((json.dumps(record) + "\n") * 3 + json.dumps(cpu_timed) + "\n")
    wait_until(lambda: fake_server.measurements == 1)  # three calls of one context: one row, count 3
    metrics = client.get("/metrics").text
    assert 'dynamiccl_agent_measurements_received_total{source="inspector"} 3.0' in metrics
    assert 'dynamiccl_agent_inspector_records_unused{reason="cpu_timed"} 1.0' in metrics

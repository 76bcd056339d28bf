"""The v1 API as clients see it (shared/design/API.md): every endpoint and error path."""

import pytest
from fastapi.testclient import TestClient

from dynamiccl.server.app import create_app

FABRIC = {"gpu": "H100-SXM", "gpus_per_node": 8, "intra_node": "nvswitch",
          "inter_node": "ib-ndr400", "nics_per_node": 8, "nccl_version": "2.28.9"}
CONTEXT = {"collective": "allreduce", "nbytes": 67108864, "nranks": 16, "nnodes": 2}
MEASUREMENT = {"context": CONTEXT, "config": {"algo": "ring", "proto": "ll128", "nchannels": 16},
               "latency_us": 812.5, "count": 20, "source": "inspector", "job_id": "llama8b-0412",
               "ts": 1764000000.0, "suggestion_id": "s-91f2"}


@pytest.fixture
def client(sqlite_store):
    with TestClient(create_app(store=sqlite_store, tokens={})) as client:
        assert client.put("/v1/fabrics/dgx-h100-a", json=FABRIC).status_code == 201
        yield client


def post_batch(client, batch_id="agent7-000123", measurements=(MEASUREMENT,), fabric_id="dgx-h100-a"):
    return client.post("/v1/measurements", json={"fabric_id": fabric_id, "batch_id": batch_id,
                                                 "measurements": list(measurements)})


def stored_count(client) -> int:
    return client.get("/v1/fabrics/dgx-h100-a").json()["measurements"]


def test_put_fabric_creates_then_replaces_and_echoes(client):
    replaced = client.put("/v1/fabrics/dgx-h100-a", json={**FABRIC, "nics_per_node": 4})
    assert replaced.status_code == 200
    assert replaced.json()["fabric_id"] == "dgx-h100-a" and replaced.json()["nics_per_node"] == 4


def test_get_fabric_counts_measurements_and_contexts(client):
    post_batch(client, measurements=[MEASUREMENT, MEASUREMENT, {**MEASUREMENT, "context": {**CONTEXT, "nbytes": 1024}}])
    body = client.get("/v1/fabrics/dgx-h100-a").json()
    assert body["measurements"] == 3 and body["contexts"] == 2 and body["gpu"] == "H100-SXM"


def test_unknown_fabric_is_404_everywhere(client):
    assert client.get("/v1/fabrics/nope").status_code == 404
    assert post_batch(client, fabric_id="nope").status_code == 404
    assert client.post("/v1/suggest", json={"fabric_id": "nope", "contexts": [CONTEXT]}).status_code == 404
    answer = client.post("/v1/recommend", json={"fabric_id": "nope", "contexts": [CONTEXT]})
    assert answer.status_code == 404 and "nope" in answer.json()["detail"]


def test_a_batch_id_seen_before_changes_nothing(client):
    first = post_batch(client)
    again = post_batch(client)
    assert first.status_code == again.status_code == 202
    assert first.json() == {"accepted": 1, "duplicate_batch": False}
    assert again.json() == {"accepted": 0, "duplicate_batch": True}
    assert stored_count(client) == 1


def test_oversize_batch_is_413_and_stores_nothing(client):
    assert post_batch(client, measurements=[MEASUREMENT] * 10_001).status_code == 413
    assert stored_count(client) == 0


def test_a_config_the_fabric_cannot_run_rejects_the_whole_batch(client):
    bad = {**MEASUREMENT, "config": {"algo": "nvls", "proto": "simple"}}  # NVLS is single-node
    answer = post_batch(client, measurements=[MEASUREMENT, bad])
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "measurements", 1, "config"]
    assert stored_count(client) == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"latency_us": -1}, "latency_us"),
        ({"count": 0}, "count"),
        ({"source": "rumour"}, "source"),
        ({"context": {**CONTEXT, "nnodes": 17}}, "context"),
        ({"context": {**CONTEXT, "nbytes": -5}}, "nbytes"),
        ({"config": {"nchannels": 65}}, "nchannels"),
    ],
)
def test_malformed_measurements_are_422_naming_the_field(client, change, field):
    answer = post_batch(client, measurements=[{**MEASUREMENT, **change}])
    assert answer.status_code == 422
    assert any(field in map(str, error["loc"]) for error in answer.json()["detail"])
    assert stored_count(client) == 0


@pytest.mark.parametrize(
    "body",
    [
        b'{"fabric_id": "dgx-h100-a", "batch_id": "b", "measurements": [{"latency_us": NaN}]}',
        b'{"fabric_id": "dgx-h100-a", "batch_id": "b", "measurements": [{"latency_us": Infinity}]}',
        b'{"fabric_id": ' + b"9" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
        b"not json at all",
        b"",
    ],
)
def test_hostile_bodies_get_a_clear_4xx_never_a_500(client, body):
    answer = client.post("/v1/measurements", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= answer.status_code < 500
    assert "detail" in answer.json()
    assert stored_count(client) == 0


def test_wrong_content_type_is_refused(client):
    answer = client.post("/v1/suggest", content=b"fabric_id=x", headers={"Content-Type": "text/plain"})
    assert answer.status_code == 422


def test_bad_fabric_id_in_the_path_is_422(client):
    answer = client.put("/v1/fabrics/bad id!", json=FABRIC)
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["path", "fabric_id"]


def test_suggest_answers_one_per_context_in_order(client):
    contexts = [{**CONTEXT, "nbytes": n} for n in (1024, 1 << 20, 1 << 30)]
    suggestions = client.post("/v1/suggest", json={"fabric_id": "dgx-h100-a", "contexts": contexts}).json()["suggestions"]
    assert [s["context"]["nbytes"] for s in suggestions] == [1024, 1 << 20, 1 << 30]
    assert all(s["kind"] == "default" for s in suggestions), "nothing measured yet: the default comes first"
    assert len({s["suggestion_id"] for s in suggestions}) == 3


def test_pinned_suggestions_are_identical_for_every_caller(client):
    body = {"fabric_id": "dgx-h100-a", "contexts": [CONTEXT], "job_id": "job", "round": 7}
    first = client.post("/v1/suggest", json=body).json()
    post_batch(client)  # the learner moves on; the pinned answer must not
    assert client.post("/v1/suggest", json=body).json() == first
    other_round = client.post("/v1/suggest", json={**body, "round": 8}).json()
    assert other_round["suggestions"][0]["suggestion_id"] != first["suggestions"][0]["suggestion_id"]


def test_recommend_without_data_is_the_nccl_default(client):
    answer = client.post("/v1/recommend", json={"fabric_id": "dgx-h100-a",
                                                "contexts": [{**CONTEXT, "weight": 120.0}]}).json()
    (recommendation,) = answer["recommendations"]
    assert recommendation["config"] == {"algo": None, "proto": None, "nchannels": None}
    assert recommendation["speedup"] == 1.0 and answer["env"] == {}
    assert answer["tuner_config"].startswith("#")


def test_a_job_keeps_its_recommendation_until_refreshed(client):
    body = {"fabric_id": "dgx-h100-a", "contexts": [CONTEXT], "job_id": "llama"}
    first = client.post("/v1/recommend", json=body).json()
    different = client.post("/v1/recommend", json={**body, "contexts": [{**CONTEXT, "nbytes": 8}]}).json()
    assert different == first
    refreshed = client.post("/v1/recommend", json={**body, "contexts": [{**CONTEXT, "nbytes": 8}], "refresh": True}).json()
    assert refreshed["recommendations"][0]["context"]["nbytes"] == 8


def test_health_and_metrics_are_open(sqlite_store):
    with TestClient(create_app(store=sqlite_store, tokens={"ci": "s3cret"})) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/metrics").status_code == 200


def test_tokens_guard_the_v1_api(sqlite_store):
    with TestClient(create_app(store=sqlite_store, tokens={"ci": "s3cret"})) as client:
        missing = client.put("/v1/fabrics/x", json=FABRIC)
        wrong = client.put("/v1/fabrics/x", json=FABRIC, headers={"Authorization": "Bearer nope"})
        right = client.put("/v1/fabrics/x", json=FABRIC, headers={"Authorization": "Bearer s3cret"})
        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert right.status_code == 201
        assert "s3cret" not in client.get("/metrics").text


def test_metrics_count_requests_by_route_template_and_batches_by_result(client):
    post_batch(client)
    post_batch(client)
    client.get("/v1/fabrics/some-unknown-id")
    text = client.get("/metrics").text
    assert 'dynamiccl_http_requests_total{method="POST",route="/v1/measurements",status="202"} 2.0' in text
    assert 'route="/v1/fabrics/{fabric_id}"' in text and "some-unknown-id" not in text
    assert 'dynamiccl_batches_total{result="duplicate"} 1.0' in text
    assert "dynamiccl_measurements_ingested_total 1.0" in text


def test_openapi_schema_is_served(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/fabrics/{fabric_id}", "/v1/measurements", "/v1/suggest", "/v1/recommend"} <= set(paths)

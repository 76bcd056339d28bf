"""Prometheus metrics: one registry per app, route templates as labels, ingest, batch results,
suggestion kinds, fabric and context gauges, predicted speedup, refits and observe errors."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from dynamiccl.server.metrics import ServerMetrics


def _samples(client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_are_counted_by_route_template_never_raw_path(client):
    client.get("/v1/fabrics/dgx-h100-a")
    client.get("/v1/fabrics/unknown-one")
    samples = _samples(client)
    route = "/v1/fabrics/{fabric_id}"
    assert _value(samples, "dynamiccl_http_requests_total", route=route, method="GET", status="200") == 1
    assert _value(samples, "dynamiccl_http_requests_total", route=route, method="GET", status="404") == 1
    assert _value(samples, "dynamiccl_http_request_duration_seconds_count", route=route, method="GET") == 2
    assert not any("unknown-one" in str(labels) for _, labels in samples)


def test_ingest_and_batch_results(client, examples):
    client.post("/v1/measurements", json=examples.batch("b1", n=3))
    client.post("/v1/measurements", json=examples.batch("b1", n=3))
    client.post("/v1/measurements", json={**examples.batch("b2"), "measurements": "nope"})
    client.post("/v1/measurements", json=examples.batch("b3", fabric_id="unknown"))
    samples = _samples(client)
    assert _value(samples, "dynamiccl_measurements_ingested_total") == 3
    assert _value(samples, "dynamiccl_batches_total", result="accepted") == 1
    assert _value(samples, "dynamiccl_batches_total", result="duplicate") == 1
    assert _value(samples, "dynamiccl_batches_total", result="rejected") == 2


def test_suggestions_by_kind_give_the_exploration_share(client, examples):
    contexts = [{**examples.CONTEXT, "nbytes": 1 << i} for i in range(40)]
    kinds = [s["kind"] for s in client.post("/v1/suggest", json=examples.suggest(contexts=contexts))
             .json()["suggestions"]]
    samples = _samples(client)
    for kind in ("explore", "default"):
        assert _value(samples, "dynamiccl_suggestions_total", kind=kind) == kinds.count(kind)
    assert _value(samples, "dynamiccl_exploration_share") == kinds.count("explore") / len(kinds)


def test_fabric_and_context_gauges(client, examples):
    client.put("/v1/fabrics/second", json=examples.FABRIC)
    client.post("/v1/measurements", json=examples.batch(n=4))
    client.get("/v1/fabrics/dgx-h100-a")
    samples = _samples(client)
    assert _value(samples, "dynamiccl_fabrics") == 2
    assert _value(samples, "dynamiccl_contexts", fabric="dgx-h100-a") == 4


def test_predicted_speedup_is_the_weighted_geometric_mean(client, tuner, examples):
    tuner.speedup = 1.5
    body = examples.recommend(contexts=[{**examples.CONTEXT, "weight": 3.0},
                                        {**examples.CONTEXT, "nbytes": 1024, "weight": 1.0}])
    client.post("/v1/recommend", json=body)
    samples = _samples(client)
    assert math.isclose(_value(samples, "dynamiccl_predicted_speedup", fabric="dgx-h100-a"), 1.5)


def test_refits_and_observe_errors(client, tuner, examples):
    client.app.state.metrics.observe_refit(0.02)
    tuner.fail_observe = True
    client.post("/v1/measurements", json=examples.batch(n=1))
    samples = _samples(client)
    assert _value(samples, "dynamiccl_refit_duration_seconds_count") == 1
    assert _value(samples, "dynamiccl_observe_errors_total") == 1


def test_each_app_has_its_own_registry():
    first, second = ServerMetrics(), ServerMetrics()
    first.observe_refit(1.0)
    assert b"dynamiccl_refit_duration_seconds_count 1.0" in first.render()
    assert b"dynamiccl_refit_duration_seconds_count 0.0" in second.render()

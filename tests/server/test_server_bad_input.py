"""Malformed input: every variant is refused with a 4xx naming what is wrong, never reaches the
500 handler (the client fixture re-raises server exceptions), and stores nothing."""

from __future__ import annotations

import copy
import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamiccl.server.app import create_app
from dynamiccl.server.storage import SqlStore


def _set(body: dict, path: tuple, value: object) -> dict:
    """A deep copy of `body` with the field at `path` set to `value` (removed when value is `...`)."""
    body = copy.deepcopy(body)
    *parents, last = path
    target = body
    for key in parents:
        target = target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return body


M = ("measurements", 0)
BATCH_VARIANTS = [  # (path to the field, bad value or ... for missing)
    (("fabric_id",), ...), (("fabric_id",), "bad id!"), (("fabric_id",), 7),
    (("batch_id",), ...), (("batch_id",), ""), (("batch_id",), "x" * 129),
    (("measurements",), ...), (("measurements",), {"not": "a list"}),
    ((*M, "context"), ...), ((*M, "context", "collective"), "allsum"), ((*M, "context", "nbytes"), -1),
    ((*M, "context", "nbytes"), 1.5), ((*M, "context", "nbytes"), "lots"), ((*M, "context", "nranks"), 0),
((*M, "config", "algo"), "warp"), ((*M, "config", "proto"), "ll256"),
    ((*M, "config", "nchannels"), 0), ((*M, "config", "nchannels"), 65), ((*M, "latency_us"), 0),
    ((*M, "latency_us"), -3.0), ((*M, "latency_us"), 1e300), ((*M, "latency_us"), ...),
    ((*M, "count"), 0), ((*M, "source"), "guess"), ((*M, "job_id"), ""), ((*M, "ts"), "yesterday"),
    ((*M, "suggestion_id"), "s" * 200), (("batch_id",), "b\x00"), ((*M, "job_id"), "job\x00-1"),
    ((*M, "job_id"), "line\nbreak"), ((*M, "suggestion_id"), "s-\x7f"),
]
FABRIC_VARIANTS = [(("gpu",), ...), (("gpu",), ""), (("gpus_per_node",), 0), (("gpus_per_node",), "eight"),
                   (("intra_node",), None), (("nics_per_node",), -1), (("sharp",), "maybe")]
SUGGEST_VARIANTS = [(("contexts",), []), (("contexts",), ...), (("contexts", 0, "nranks"), -4),
                    (("round",), -1), (("round",), "first"), (("job_id",), ""), (("job_id",), "j\x00")]
RECOMMEND_VARIANTS = [(("contexts", 0, "weight"), -1.0), (("contexts", 0, "weight"), "heavy"),
                      (("contexts", 0, "collective"), None), (("refresh",), "please")]


def _assert_refused_naming(response, path: tuple) -> None:
    assert response.status_code == 422, response.text
    locs = [tuple(error["loc"]) for error in response.json()["detail"]]
    assert any(loc[1:1 + len(path)] == path for loc in locs), (path, locs)


def _nothing_stored(client: TestClient) -> None:
    assert client.app.state.store.fabric_counts("dgx-h100-a") == (0, 0)


@pytest.mark.parametrize(("path", "value"), BATCH_VARIANTS, ids=repr)
def test_a_malformed_batch_is_422_naming_the_field(client, examples, path, value):
    response = client.post("/v1/measurements", json=_set(examples.batch(n=2), path, value))
    _assert_refused_naming(response, path)
    _nothing_stored(client)


@pytest.mark.parametrize(("path", "value"), FABRIC_VARIANTS, ids=repr)
def test_a_malformed_fabric_is_422_naming_the_field(client, examples, path, value):
    response = client.put("/v1/fabrics/other", json=_set(examples.FABRIC, path, value))
    _assert_refused_naming(response, path)
    assert client.get("/v1/fabrics/other").status_code == 404


@pytest.mark.parametrize(("path", "value"), SUGGEST_VARIANTS, ids=repr)
def test_a_malformed_suggest_is_422_naming_the_field(client, examples, path, value):
    _assert_refused_naming(client.post("/v1/suggest", json=_set(examples.suggest(job_id="j", round=0),
                                                                 path, value)), path)


@pytest.mark.parametrize(("path", "value"), RECOMMEND_VARIANTS, ids=repr)
def test_a_malformed_recommend_is_422_naming_the_field(client, examples, path, value):
    _assert_refused_naming(client.post("/v1/recommend", json=_set(examples.recommend(), path, value)), path)


def test_more_nodes_than_ranks_is_422_naming_the_context(client, examples):
    response = client.post("/v1/measurements", json=_set(examples.batch(n=2), (*M, "context", "nnodes"), 32))
    _assert_refused_naming(response, (*M, "context"))
    assert "nnodes" in response.json()["detail"][0]["msg"]


def test_more_than_1000_contexts_is_422(client, examples):
    response = client.post("/v1/suggest", json=examples.suggest(contexts=[examples.CONTEXT] * 1001))
    _assert_refused_naming(response, ("contexts",))


def test_a_batch_over_10000_measurements_is_413_and_stores_nothing(client, examples):
    body = {**examples.batch(n=0), "measurements": [examples.measurement()] * 10_001}
    response = client.post("/v1/measurements", json=body)
    assert response.status_code == 413 and "10000" in response.json()["detail"]
    _nothing_stored(client)


def test_exactly_10000_measurements_are_accepted(client, examples):
    body = {**examples.batch(n=0), "measurements": [examples.measurement()] * 10_000}
    assert client.post("/v1/measurements", json=body).json() == {"accepted": 10_000, "duplicate_batch": False}


def _raw(client: TestClient, body: bytes | str, content_type: str | None = "application/json", path="/v1/measurements"):
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post(path, content=body, headers=headers)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(client, examples, constant):
    text = json.dumps(examples.batch(n=1)).replace("812.5", constant).replace("100.0", constant)
    response = _raw(client, text)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == "json_invalid" and constant.lstrip("-") in error["ctx"]["error"]
    _nothing_stored(client)


def test_nan_is_refused_even_in_fields_the_server_ignores(client, examples):
    assert _raw(client, json.dumps({**examples.batch(n=1), "extra": float("nan")})).status_code == 422
    _nothing_stored(client)


def test_an_overflowing_float_is_refused_naming_the_field(client, examples):
    text = json.dumps(examples.batch(n=1)).replace("100.0", "1e999")  # Python reads it as inf
    response = _raw(client, text)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "measurements", 0, "latency_us"]


@pytest.mark.parametrize("digits", [30, 5000])
def test_huge_integers_are_refused(client, examples, digits):
    text = json.dumps(examples.batch(n=1)).replace('"nbytes": 1024', '"nbytes": ' + "9" * digits)
    response = _raw(client, text)
    assert response.status_code == 422
    _nothing_stored(client)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_refused(client, depth):
    for path in ("/v1/measurements", "/v1/suggest", "/v1/recommend"):
        response = _raw(client, "[" * depth + "]" * depth, path=path)
        assert response.status_code == 422


@pytest.mark.parametrize("body", [b"", b"not json", b'{"fabric_id": "dgx-h100-a",', b"\xff\xfe\x00garbage", b"[]",
                                  b"null", b'"a string"'])
def test_a_body_that_is_not_a_json_object_is_422(client, body):
    response = _raw(client, body)
    assert response.status_code == 422 and response.json()["detail"]
    _nothing_stored(client)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_declared_json_is_422(client, examples, content_type):
    response = _raw(client, json.dumps(examples.batch(n=1)), content_type=content_type)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "body"
    _nothing_stored(client)


def test_a_body_over_the_size_limit_is_413(client, examples):
    response = _raw(client, b" " * (33 * 1024 * 1024))
    assert response.status_code == 413


def test_the_catch_all_handler_answers_json_500(sqlite_url, examples, tuner):
    """Only a server bug reaches it: here a tuner that breaks."""
    def broken(*args):
        raise RuntimeError("bug")

    tuner.suggest = broken
    app = create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens={})
    with TestClient(app, raise_server_exceptions=False) as client:
        client.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC)
        response = client.post("/v1/suggest", json=examples.suggest())
    assert response.status_code == 500 and response.json() == {"detail": "internal server error"}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/measurements", "/v1/suggest", "/v1/recommend", "/v1/fabrics/fuzz"]),
       body=_json, fields=st.dictionaries(st.sampled_from(["fabric_id", "batch_id", "measurements", "contexts",
                                                           "job_id", "round", "refresh", "gpu"]), _json))
def test_arbitrary_json_never_gives_a_500(client, path, body, fields):
    payload = {**fields} if isinstance(body, dict) or body is None else body
    method = client.put if path.startswith("/v1/fabrics") else client.post
    assert method(path, json=payload).status_code < 500

"""The HTTP client: typed answers, retries on transient failures, the server's message on errors."""

import httpx
import pytest

from dynamiccl.client import ApiError, DynamicclClient
from dynamiccl.schemas import Context, Fabric


def client_for(handler) -> DynamicclClient:
    return DynamicclClient("http://server", transport=httpx.MockTransport(handler), max_backoff=0.01)


FABRIC = Fabric(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-ndr400")
CONTEXT = Context(collective="allreduce", nbytes=1024, nranks=8, nnodes=1)


def test_retries_transient_failures_then_returns_the_typed_answer():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(503, json={"detail": "database unreachable"}, headers={"Retry-After": "0"})
        return httpx.Response(202, json={"accepted": 0, "duplicate_batch": False})

    with client_for(handler) as api:
        answer = api.post_measurements("fab", "batch-1", [])
    assert answer.accepted == 0 and len(calls) == 3
    assert {c.content for c in calls} == {calls[0].content}, "a retry resends the same batch id"


def test_client_errors_are_not_retried_and_carry_the_servers_message():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        detail = [{"loc": ["body", "contexts", 0, "nbytes"], "msg": "Input should be >= 0"}]
        return httpx.Response(422, json={"detail": detail})

    with client_for(handler) as api, pytest.raises(ApiError) as caught:
        api.suggest("fab", [CONTEXT])
    assert len(calls) == 1
    assert caught.value.status_code == 422
    assert "body.contexts.0.nbytes: Input should be >= 0" in str(caught.value)


def test_gives_up_after_the_configured_attempts():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, text="boom")

    with client_for(handler) as api, pytest.raises(ApiError, match="500"):
        api.get_fabric("fab")
    assert len(calls) == 4


def test_sends_the_bearer_token_and_the_documented_body():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers.get("Authorization")
        seen["path"] = request.url.path
        seen["body"] = request.read()
        return httpx.Response(200, json={"suggestions": [
            {"context": CONTEXT.model_dump(mode="json"), "config": {"algo": None},
             "kind": "default", "suggestion_id": "s-1"}]})

    api = DynamicclClient("http://server", token="t0k", transport=httpx.MockTransport(handler))
    suggestions = api.suggest("fab", [CONTEXT], job_id="job", round=3)
    assert seen["auth"] == "Bearer t0k" and seen["path"] == "/v1/suggest"
    assert b'"round":3' in seen["body"] and b'"job_id":"job"' in seen["body"]
    assert suggestions[0].config.is_default


def test_put_fabric_returns_the_echo():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={**FABRIC.model_dump(mode="json"), "fabric_id": "fab"})

    assert client_for(handler).put_fabric("fab", FABRIC).fabric_id == "fab"

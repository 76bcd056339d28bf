"""Limits: per-client rate limiting (a token bucket per token name, or address when the API is
open, answered 429 with Retry-After; off unless configured) and the JSON nesting bound."""

from __future__ import annotations

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from dynamiccl.server.app import create_app
from dynamiccl.server.limits import RateLimit, RateLimiter
from dynamiccl.server.storage import SqlStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_allows_a_burst_then_the_rate_and_says_when_to_retry():
    clock = Clock()
    limiter = RateLimiter(RateLimit(rate=2.0, burst=3), clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(HTTPException) as refused:
        limiter.check("a")
    assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "1"
    limiter.check("b")  # buckets are per client
    clock.now = 0.5  # one token back at 2/s
    limiter.check("a")
    with pytest.raises(HTTPException):
        limiter.check("a")
    clock.now = 100.0  # refills up to the burst, no further
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(HTTPException):
        limiter.check("a")


def test_slow_rates_ask_for_a_longer_wait():
    limiter = RateLimiter(RateLimit(rate=0.1, burst=1), clock=Clock())
    limiter.check("a")
    with pytest.raises(HTTPException) as refused:
        limiter.check("a")
    assert refused.value.headers["Retry-After"] == "10"


def test_configuration_from_the_environment():
    assert RateLimit.from_env({}) is None
    assert RateLimit.from_env({"DYNAMICCL_RATE_LIMIT": "0"}) is None
    assert RateLimit.from_env({"DYNAMICCL_RATE_LIMIT": "50"}) == RateLimit(50.0, 100)
    assert RateLimit.from_env({"DYNAMICCL_RATE_LIMIT": "5", "DYNAMICCL_RATE_BURST": "7"}) == RateLimit(5.0, 7)
    for bad in ({"DYNAMICCL_RATE_LIMIT": "fast"}, {"DYNAMICCL_RATE_LIMIT": "-1"},
                {"DYNAMICCL_RATE_LIMIT": "5", "DYNAMICCL_RATE_BURST": "0"}):
        with pytest.raises(ValueError, match="DYNAMICCL_RATE"):
            RateLimit.from_env(bad)


def test_the_api_answers_429_with_retry_after_per_token(sqlite_url, tuner, examples):
    tokens = {"one": "token-one", "two": "token-two"}
    app = create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens=tokens, rate_limit=RateLimit(0.01, 2))
    one, two = ({"Authorization": f"Bearer {t}"} for t in tokens.values())
    with TestClient(app) as api:
        assert api.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC, headers=one).status_code == 201
        assert api.post("/v1/suggest", json=examples.suggest(), headers=one).status_code == 200
        refused = api.post("/v1/measurements", json=examples.batch(), headers=one)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "rate limit" in refused.json()["detail"]
        assert api.app.state.store.fabric_counts("dgx-h100-a") == (0, 0)
        assert api.post("/v1/suggest", json=examples.suggest(), headers=two).status_code == 200
        assert api.get("/healthz").status_code == 200 and api.get("/metrics").status_code == 200  # never limited
        assert 'status="429"' in api.get("/metrics").text


def test_open_api_limits_by_address_and_no_limit_is_the_default(sqlite_url, tuner, examples, monkeypatch):
    monkeypatch.delenv("DYNAMICCL_RATE_LIMIT", raising=False)
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens={})) as api:
        api.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC)
        assert all(api.post("/v1/suggest", json=examples.suggest()).status_code == 200 for _ in range(50))
    monkeypatch.setenv("DYNAMICCL_RATE_LIMIT", "0.01")
    monkeypatch.setenv("DYNAMICCL_RATE_BURST", "1")
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens={})) as api:
        assert api.post("/v1/suggest", json=examples.suggest()).status_code == 200
        assert api.post("/v1/suggest", json=examples.suggest()).status_code == 429


def test_json_nesting_is_bounded_at_32_levels(client, examples):
    def nested(depth: int) -> bytes:  # a suggest body whose `job_id` nests `depth` levels in all
        return b'{"fabric_id": "dgx-h100-a", "contexts": [], "job_id": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    headers = {"Content-Type": "application/json"}
    at_limit = client.post("/v1/suggest", content=nested(32), headers=headers)
    assert at_limit.status_code == 422 and at_limit.json()["detail"][0]["type"] != "json_invalid"
    over = client.post("/v1/suggest", content=nested(33), headers=headers)
    assert over.status_code == 422 and over.json()["detail"][0]["type"] == "json_invalid"
    assert "32 levels" in over.json()["detail"][0]["ctx"]["error"]

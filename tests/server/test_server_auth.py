"""Bearer tokens: every /v1 call needs one when tokens are configured; /healthz and /metrics stay
open; the token's name, never the token, is recorded and logged."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from dynamiccl.server.app import create_app
from dynamiccl.server.auth import load_tokens
from dynamiccl.server.storage import SqlStore

TOKENS = {"agent-7": "tok-agent-7-secret", "launcher": "tok-launcher-secret"}


@pytest.fixture
def authed(sqlite_url, tuner, examples):
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens=TOKENS)) as client:
        response = client.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC, headers=_bearer("launcher"))
        assert response.status_code == 201
        yield client


def _bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def test_load_tokens_reads_names_comments_and_the_environment(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# agents\nagent-7:abc  # the big one\n\nplain-token\n")
    tokens = load_tokens(path, env={"DYNAMICCL_TOKENS": "ci:xyz, other"})
    assert {name: t.secret for name, t in tokens.items()} == {
        "agent-7": "abc", "token-2": "plain-token", "ci": "xyz", "token-4": "other"}
    assert load_tokens(None, env={}) == {}


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dG9rOnRvaw=="},
    {"Authorization": "Bearer"}, {"Authorization": f"Token {TOKENS['agent-7']}"},
])
def test_a_missing_or_wrong_token_is_401_with_www_authenticate(authed, examples, headers):
    for method, path, body in [("GET", "/v1/fabrics/dgx-h100-a", None),
                               ("PUT", "/v1/fabrics/x", examples.FABRIC),
                               ("POST", "/v1/measurements", examples.batch()),
                               ("POST", "/v1/suggest", examples.suggest()),
                               ("POST", "/v1/recommend", examples.recommend())]:
        response = authed.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert authed.app.state.store.fabric_counts("dgx-h100-a") == (0, 0)


def test_the_token_is_checked_before_the_body_is_read(authed):
    response = authed.post("/v1/measurements", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401


def test_every_configured_token_works_and_its_name_is_recorded(authed, examples):
    response = authed.post("/v1/measurements", json=examples.batch(n=2), headers=_bearer("agent-7"))
    assert response.status_code == 202
    assert {m.client for m in authed.app.state.store.measurements("dgx-h100-a")} == {"agent-7"}
    assert authed.get("/v1/fabrics/dgx-h100-a", headers=_bearer("launcher")).status_code == 200


def test_health_and_metrics_stay_open(authed):
    assert authed.get("/healthz").status_code == 200
    assert authed.get("/metrics").status_code == 200


def test_start_up_says_whether_the_api_is_open_and_never_logs_tokens(sqlite_url, tuner, caplog):
    caplog.set_level(logging.INFO)
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens={})):
        pass
    assert "open" in caplog.text
    caplog.clear()
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens=TOKENS)) as client:
        client.get("/v1/fabrics/x", headers={"Authorization": "Bearer tok-agent-7-secret"})
        client.get("/v1/fabrics/x", headers={"Authorization": "Bearer guessed-wrong"})
    assert "auth on" in caplog.text
    assert not any(token in caplog.text for token in [*TOKENS.values(), "guessed-wrong"])

"""Token scopes: agent (measurements, suggest, recommend, registering a fabric), read (GET,
recommend), admin (everything, including changing a registered fabric). Wrong scope is 403 with
a JSON detail naming the scope; tokens never reach logs or /metrics."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from dynamiccl.server.app import create_app
from dynamiccl.server.auth import DEFAULT_SCOPES, Scope, TokenFileError, load_tokens
from dynamiccl.server.storage import SqlStore

SECRETS = {"agent": "s3cr3t-agent-token", "reader": "s3cr3t-read-token", "root": "s3cr3t-admin-token",
           "legacy": "s3cr3t-legacy-token"}
TOKEN_FILE = (f"agent:{SECRETS['agent']}:agent\nreader:{SECRETS['reader']}:read\n"
              f"root:{SECRETS['root']}:admin\nlegacy:{SECRETS['legacy']}\n")


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(TOKEN_FILE)
    return load_tokens(path, env={})


@pytest.fixture
def api(sqlite_url, tuner, tokens, examples):
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens=tokens)) as client:
        assert client.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC, headers=bearer("root")).status_code == 201
        yield client


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def calls(examples) -> dict[str, tuple[str, str, object]]:
    return {
        "get": ("GET", "/v1/fabrics/dgx-h100-a", None),
        "measurements": ("POST", "/v1/measurements", examples.batch()),
        "suggest": ("POST", "/v1/suggest", examples.suggest()),
        "recommend": ("POST", "/v1/recommend", examples.recommend()),
        "register": ("PUT", "/v1/fabrics/dgx-h100-a", examples.FABRIC),
    }


ALLOWED = {
    "agent": {"measurements", "suggest", "recommend", "register"},
    "reader": {"get", "recommend"},
    "root": {"get", "measurements", "suggest", "recommend", "register"},
    "legacy": {"get", "measurements", "suggest", "recommend", "register"},
}


def test_the_token_file_reads_scopes_and_stays_backward_compatible(tokens, tmp_path):
    assert tokens["agent"].scopes == {Scope.agent}
    assert tokens["reader"].scopes == {Scope.read}
    assert tokens["root"].scopes == {Scope.admin}
    assert tokens["legacy"].scopes == DEFAULT_SCOPES == {Scope.agent, Scope.read}
    both = load_tokens(None, env={"DYNAMICCL_TOKENS": "ci:xyz:read+agent, bare"})
    assert both["ci"].scopes == {Scope.read, Scope.agent} and both["token-2"].scopes == DEFAULT_SCOPES
    assert load_tokens(_file(tmp_path, "x:y:agent, READ\n"), env={})["x"].scopes == {Scope.agent, Scope.read}


@pytest.mark.parametrize("line", ["x:hush-hush:superuser", "a:hush-hush:c:d", "x::agent"])
def test_a_bad_token_line_is_refused_naming_the_line_not_the_secret(tmp_path, line):
    with pytest.raises(TokenFileError) as error:
        load_tokens(_file(tmp_path, f"# header\n{line}\n"), env={})
    assert "line 2" in str(error.value) and "hush-hush" not in str(error.value)


def _file(tmp_path, text: str):
    path = tmp_path / "more-tokens"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_each_scope_allows_its_endpoints_and_is_403_elsewhere(api, examples, name):
    for index, (call, (method, path, body)) in enumerate(calls(examples).items()):
        if call == "measurements":
            body = {**body, "batch_id": f"{name}-{index}"}
        response = api.request(method, path, json=body, headers=bearer(name))
        if call in ALLOWED[name]:
            assert response.status_code < 400, (name, call, response.text)
        else:
            assert response.status_code == 403, (name, call)
            detail = response.json()["detail"]
            assert name in detail and "needs scope" in detail and path.split("/")[2] in detail


def test_wrong_scope_is_checked_before_the_body_is_read_and_changes_nothing(api):
    response = api.post("/v1/measurements", content=b"{not json", headers={**bearer("reader"),
                                                                           "Content-Type": "application/json"})
    assert response.status_code == 403
    assert api.app.state.store.fabric_counts("dgx-h100-a") == (0, 0)


def test_changing_a_registered_fabric_needs_admin(api, examples):
    changed = {**examples.FABRIC, "gpus_per_node": 4}
    assert api.put("/v1/fabrics/dgx-h100-a", json=changed, headers=bearer("agent")).status_code == 403
    assert api.app.state.store.get_fabric("dgx-h100-a").gpus_per_node == 8
    assert api.put("/v1/fabrics/new-one", json=changed, headers=bearer("agent")).status_code == 201
    assert api.put("/v1/fabrics/dgx-h100-a", json=changed, headers=bearer("root")).status_code == 200
    assert api.app.state.store.get_fabric("dgx-h100-a").gpus_per_node == 4


def test_tokens_never_reach_logs_or_metrics(sqlite_url, tuner, tokens, examples, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "s3cr3t-guessed-wrong"
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens=tokens)) as api:
        api.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC, headers=bearer("root"))
        for name in SECRETS:
            for method, path, body in calls(examples).values():
                api.request(method, path, json=body, headers=bearer(name))
        api.get("/v1/fabrics/dgx-h100-a", headers={"Authorization": f"Bearer {wrong}"})
        api.post("/v1/measurements", content=b"[", headers={**bearer("agent"), "Content-Type": "application/json"})
        scraped = api.get("/metrics").text
    assert 'status="403"' in scraped and 'status="401"' in scraped  # the refusals were counted
    for secret in [*SECRETS.values(), wrong]:
        assert secret not in scraped and secret not in caplog.text
    assert "s3cr3t" not in repr(tokens)


def test_re_pinning_a_jobs_recommendation_needs_the_agent_scope(api, examples):
    pinned = api.post("/v1/recommend", json=examples.recommend(job_id="j1"), headers=bearer("reader"))
    assert pinned.status_code == 200
    refused = api.post("/v1/recommend", json=examples.recommend(job_id="j1", refresh=True), headers=bearer("reader"))
    assert refused.status_code == 403 and "re-pin" in refused.json()["detail"] and "agent" in refused.json()["detail"]
    assert api.post("/v1/recommend", json=examples.recommend(job_id="j1"), headers=bearer("reader")).json() == pinned.json()
    again = api.post("/v1/recommend", json=examples.recommend(job_id="j1", refresh=True), headers=bearer("agent"))
    assert again.status_code == 200

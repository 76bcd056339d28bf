"""The v1 endpoints as shared/design/API.md describes them, with a scripted tuner over SQLite."""

from __future__ import annotations

from fastapi.testclient import TestClient

from dynamiccl.server.app import create_app
from dynamiccl.server.storage import SqlStore


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_put_fabric_creates_201_then_replaces_200_and_echoes(client, examples):
    created = client.put("/v1/fabrics/new-fabric:1.a", json=examples.FABRIC)
    assert created.status_code == 201
    assert created.json() == {**examples.FABRIC, "sharp": False, "fabric_id": "new-fabric:1.a"}
    replaced = client.put("/v1/fabrics/new-fabric:1.a", json={**examples.FABRIC, "gpus_per_node": 4})
    assert replaced.status_code == 200 and replaced.json()["gpus_per_node"] == 4


def test_fabric_names_are_case_insensitive_on_input(client, examples):
    body = client.put("/v1/fabrics/f", json={**examples.FABRIC, "intra_node": "NVSwitch"}).json()
    assert body["intra_node"] == "nvswitch"


def test_a_fabric_id_outside_the_pattern_is_422_naming_it(client, examples):
    for bad in ("a" * 129, "sp ace", "semi;colon"):
        response = client.put(f"/v1/fabrics/{bad}", json=examples.FABRIC)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["path", "fabric_id"]


def test_get_fabric_counts_measurements_and_contexts(client, examples):
    client.post("/v1/measurements", json=examples.batch(n=3))
    body = client.get("/v1/fabrics/dgx-h100-a").json()
    assert body["fabric_id"] == "dgx-h100-a" and body["gpu"] == "H100-SXM"
    assert (body["measurements"], body["contexts"]) == (3, 3)


def test_unknown_fabric_is_404_with_a_detail_string(client, examples):
    for response in (
        client.get("/v1/fabrics/nope"),
        client.post("/v1/measurements", json=examples.batch(fabric_id="nope")),
        client.post("/v1/suggest", json={**examples.suggest(), "fabric_id": "nope"}),
        client.post("/v1/recommend", json={**examples.recommend(), "fabric_id": "nope"}),
    ):
        assert response.status_code == 404
        assert "nope" in response.json()["detail"]


def test_a_batch_is_accepted_202_then_answered_as_duplicate(client, tuner, examples):
    first = client.post("/v1/measurements", json=examples.batch(n=3))
    assert first.status_code == 202 and first.json() == {"accepted": 3, "duplicate_batch": False}
    again = client.post("/v1/measurements", json=examples.batch(n=5))
    assert again.status_code == 202 and again.json() == {"accepted": 0, "duplicate_batch": True}
    assert client.app.state.store.fabric_counts("dgx-h100-a") == (3, 3)
    assert tuner.observed == [("dgx-h100-a", 3)]  # duplicates are not observed twice


def test_the_tuner_observes_only_after_the_batch_is_committed(client, tuner, examples):
    store = client.app.state.store
    seen: list[int] = []
    tuner.observe = lambda fabric_id, fabric, items: seen.append(store.fabric_counts(fabric_id)[0])
    client.post("/v1/measurements", json=examples.batch(n=4))
    assert seen == [4]


def test_a_failing_tuner_never_fails_an_accepted_batch(client, tuner, examples):
    tuner.fail_observe = True
    response = client.post("/v1/measurements", json=examples.batch(n=2))
    assert response.status_code == 202 and response.json()["accepted"] == 2
    assert client.app.state.store.fabric_counts("dgx-h100-a")[0] == 2
    assert "dynamiccl_observe_errors_total 1.0" in client.get("/metrics").text


def test_a_config_the_fabric_cannot_run_is_422_naming_its_index_and_stores_nothing(client, examples):
    body = examples.batch(n=5)
    body["measurements"][3]["context"]["collective"] = "allgather"
    body["measurements"][3]["config"] = {"algo": "tree"}  # NCCL has no tree allgather
    response = client.post("/v1/measurements", json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "measurements", 3, "config"] and "tree" in error["msg"]
    assert client.app.state.store.fabric_counts("dgx-h100-a") == (0, 0)


def test_suggest_answers_each_context_in_order(client, examples):
    contexts = [{**examples.CONTEXT, "nbytes": n} for n in (1 << 30, 1024, 1 << 20)]
    response = client.post("/v1/suggest", json={"fabric_id": "dgx-h100-a", "contexts": contexts})
    assert response.status_code == 200
    suggestions = response.json()["suggestions"]
    assert [s["context"] for s in suggestions] == contexts
    for s in suggestions:
        assert s["kind"] in ("explore", "exploit", "default")
        assert set(s["config"]) == {"algo", "proto", "nchannels"}
        assert s["suggestion_id"].startswith("s-")


def test_unpinned_suggestions_get_fresh_ids_and_seeds(client, tuner, examples):
    ids = {client.post("/v1/suggest", json=examples.suggest()).json()["suggestions"][0]["suggestion_id"]
           for _ in range(5)}
    assert len(ids) == 5 and len(set(tuner.seeds)) == 5


def test_job_and_round_pin_each_context_across_replicas(sqlite_url, examples, tuner_class):
    """Two servers on one database, with tuners that would disagree, give every node the same
    config and suggestion id for a (job, round, context); another round is a new question."""
    first, second = (create_app(store=SqlStore(sqlite_url), tuner=t, tokens={})
                     for t in (tuner_class(), tuner_class(seed_offset=1)))
    with TestClient(first) as a, TestClient(second) as b:
        a.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC)
        small, medium, large = ({**examples.CONTEXT, "nbytes": n} for n in (1024, 1 << 20, 1 << 30))
        pinned = {"job_id": "llama8b-0412", "round": 3}
        from_a = a.post("/v1/suggest", json=examples.suggest(contexts=[small, large], **pinned)).json()
        from_b = b.post("/v1/suggest", json=examples.suggest(contexts=[large, medium], **pinned)).json()
        assert from_b["suggestions"][0] == from_a["suggestions"][1]
        again = a.post("/v1/suggest", json=examples.suggest(contexts=[medium, small, large], **pinned)).json()
        assert again["suggestions"] == [from_b["suggestions"][1], *from_a["suggestions"]]
        next_round = b.post("/v1/suggest", json=examples.suggest(contexts=[large], job_id="llama8b-0412",
                                                                  round=4)).json()
        assert next_round["suggestions"][0]["suggestion_id"] != from_a["suggestions"][1]["suggestion_id"]


def test_pinned_seeds_are_deterministic(client, tuner, examples):
    for _ in range(2):
        client.post("/v1/suggest", json=examples.suggest(job_id="j", round=0))
    client.post("/v1/suggest", json=examples.suggest(job_id="j", round=1))
    assert tuner.seeds[0] == tuner.seeds[1] != tuner.seeds[2]


def test_recommend_returns_the_tuners_answer(client, examples):
    response = client.post("/v1/recommend", json=examples.recommend())
    assert response.status_code == 200
    body = response.json()
    [recommendation] = body["recommendations"]
    assert recommendation["context"] == examples.CONTEXT and recommendation["speedup"] == 1.25
    config = recommendation["config"]
    assert config["algo"] is not None and body["env"] == {}, "no evidence for what an env would force"
    [rule] = [line for line in body["tuner_config"].splitlines() if not line.startswith("#")]
    assert rule.startswith("allreduce,") and f",{config['algo']},{config['proto']}," in rule


def test_a_job_keeps_its_first_recommendation_until_refreshed(client, tuner, examples):
    first = client.post("/v1/recommend", json=examples.recommend(job_id="j1")).json()
    tuner.speedup = 2.0
    assert client.post("/v1/recommend", json=examples.recommend(job_id="j1")).json() == first
    assert client.post("/v1/recommend", json=examples.recommend()).json()["recommendations"][0]["speedup"] == 2.0
    refreshed = client.post("/v1/recommend", json=examples.recommend(job_id="j1", refresh=True)).json()
    assert refreshed["recommendations"][0]["speedup"] == 2.0
    assert client.post("/v1/recommend", json=examples.recommend(job_id="j1")).json() == refreshed


def test_the_real_learner_serves_the_whole_loop(sqlite_url, examples):
    """create_app without a tuner runs DynamICCL's learner: measure, suggest, recommend."""
    with TestClient(create_app(store=SqlStore(sqlite_url), tokens={})) as client:
        client.put("/v1/fabrics/dgx-h100-a", json=examples.FABRIC)
        assert client.post("/v1/measurements", json=examples.batch(n=20)).status_code == 202
        suggestions = client.post("/v1/suggest", json=examples.suggest(job_id="j", round=0)).json()
        assert len(suggestions["suggestions"]) == 1
        recommendation = client.post("/v1/recommend", json=examples.recommend()).json()
        assert len(recommendation["recommendations"]) == 1


def test_create_app_reads_its_settings_from_the_environment(tmp_path, monkeypatch, examples, tuner):
    monkeypatch.setenv("DYNAMICCL_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.setenv("DYNAMICCL_TOKENS", "ci:secret-1")
    with TestClient(create_app(tuner=tuner)) as client:
        assert client.put("/v1/fabrics/f", json=examples.FABRIC).status_code == 401
        headers = {"Authorization": "Bearer secret-1"}
        assert client.put("/v1/fabrics/f", json=examples.FABRIC, headers=headers).status_code == 201
    assert (tmp_path / "env.db").exists()




def test_a_pinned_job_can_ask_again_without_contexts(client, examples):
    first = client.post("/v1/recommend", json=examples.recommend(job_id="llama")).json()
    assert client.post("/v1/recommend", json=examples.recommend(job_id="llama", contexts=[])).json() == first
    unknown = client.post("/v1/recommend", json=examples.recommend(job_id="other", contexts=[]))
    assert unknown.status_code == 404 and "no pinned recommendation" in unknown.json()["detail"]
    anonymous = client.post("/v1/recommend", json=examples.recommend(contexts=[]))
    assert anonymous.status_code == 422

"""Reading your own writes (API.md): an answer after a 202 takes that batch in, or says
`learner.behind`."""

from __future__ import annotations

from fastapi.testclient import TestClient

from dynamiccl.server.app import create_app
from dynamiccl.server.learner.tuner import DynamicclTuner
from dynamiccl.server.storage import SqlStore


def measurements(examples, config, latency_us, n):
    return [{**examples.measurement(nbytes=examples.CONTEXT["nbytes"], latency_us=latency_us * (1 + 0.005 * k),
                                    **config), "suggestion_id": None} for k in range(n)]


def test_a_recommendation_asked_right_after_a_post_takes_the_batch_in(sqlite_url, examples):
    with TestClient(create_app(store=SqlStore(sqlite_url), tokens={})) as client:
        client.put(f"/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC)
        fast = {"algo": "ring", "proto": "simple", "nchannels": 24}
        default = {"algo": None, "proto": None, "nchannels": None}
        batch = measurements(examples, default, 1000.0, 5) + measurements(examples, fast, 800.0, 5)
        posted = client.post("/v1/measurements", json={"fabric_id": examples.FABRIC_ID, "batch_id": "b1",
                                                        "measurements": batch})
        assert posted.status_code == 202
        body = client.post("/v1/recommend", json=examples.recommend()).json()
        assert body["learner"] == {"measurements_learned": 10, "behind": False}
        assert body["recommendations"][0]["config"] == fast, "one job's own evidence, taken in at once"
        suggestions = client.post("/v1/suggest", json=examples.suggest()).json()
        assert suggestions["learner"] == {"measurements_learned": 10, "behind": False}


def test_when_the_learner_cannot_catch_up_in_time_the_answer_says_so(sqlite_url, examples, monkeypatch):
    store = SqlStore(sqlite_url)
    tuner = DynamicclTuner(store)
    with TestClient(create_app(store=store, tuner=tuner, tokens={})) as client:
        client.put(f"/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC)
        assert client.post("/v1/recommend", json=examples.recommend()).json()["learner"]["behind"] is False
        client.post("/v1/measurements", json=examples.batch())
        knowledge = tuner.knowledge.get(examples.FABRIC_ID, store.get_fabric(examples.FABRIC_ID))
        monkeypatch.setattr("dynamiccl.server.routes.LEARNER_WAIT_S", 0.05)
        with knowledge._lock:  # a refit holding the fabric longer than the wait
            body = client.post("/v1/recommend", json=examples.recommend()).json()
        assert body["learner"] == {"measurements_learned": 0, "behind": True}
        metrics = client.get("/metrics").text
        assert "dynamiccl_learner_behind_total 1.0" in metrics
        assert client.post("/v1/recommend", json=examples.recommend()).json()["learner"]["behind"] is False

"""Reading your own writes (API.md): an answer after a 202 takes that batch in, or says
`learner.behind`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
        knowledge = tuner.knowledge.get(examples.FABRIC_ID, store.get_fabric(examples.FABRIC_ID))
        monkeypatch.setattr("dynamiccl.server.routes.LEARNER_WAIT_S", 0.05)
        with knowledge._lock:  # a refit holding the fabric, from before the batch to past the wait
            client.post("/v1/measurements", json=examples.batch())
            body = client.post("/v1/recommend", json=examples.recommend()).json()
        assert body["learner"] == {"measurements_learned": 0, "behind": True}
        metrics = client.get("/metrics").text
        assert "dynamiccl_learner_behind_total 1.0" in metrics
        assert client.post("/v1/recommend", json=examples.recommend()).json()["learner"]["behind"] is False


def test_a_request_waiting_for_the_learner_holds_up_no_other_request(sqlite_url, examples, monkeypatch):
    """Answers are made on the event loop only when the learner has nothing to catch up on; a
    request that must wait for it waits on the thread pool, and the server goes on answering."""
    store = SqlStore(sqlite_url)
    tuner = DynamicclTuner(store)
    monkeypatch.setattr("dynamiccl.server.routes.LEARNER_WAIT_S", 30.0)
    with TestClient(create_app(store=store, tuner=tuner, tokens={})) as client, ThreadPoolExecutor(1) as pool:
        client.put(f"/v1/fabrics/{examples.FABRIC_ID}", json=examples.FABRIC)
        knowledge = tuner.knowledge.get(examples.FABRIC_ID, store.get_fabric(examples.FABRIC_ID))
        with knowledge._lock:  # a refit holding the fabric: the recommendation must wait for it
            client.post("/v1/measurements", json=examples.batch())
            waiting = pool.submit(client.post, "/v1/recommend", json=examples.recommend())
            assert client.get("/healthz").status_code == 200
            unknown = client.post("/v1/recommend", json={**examples.recommend(), "fabric_id": "unknown"})
            assert unknown.status_code == 404
            assert not waiting.done()
        learned = len(examples.batch()["measurements"])
        assert waiting.result(timeout=30).json()["learner"] == {"measurements_learned": learned, "behind": False}

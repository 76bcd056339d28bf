"""A fake tuning server (httpx.MockTransport) and measurement builders for the agent suites."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from dynamiccl.agent.plugin.build import NoCompiler, build
from dynamiccl.schemas import Context, Measurement, NcclConfig


def measurement(nbytes: int = 1 << 20, latency_us: float = 100.0, count: int = 1,
                job_id: str | None = "job-1", collective: str = "allreduce",
                config: NcclConfig | None = None) -> Measurement:
    return Measurement(
        context=Context(collective=collective, nbytes=nbytes, nranks=8, nnodes=1),
        config=config or NcclConfig(), latency_us=latency_us, count=count, source="torch", job_id=job_id,
    )


class FakeServer:
    """Just enough of the v1 API: fabrics, idempotent batches, pinned recommendations.

    `down` makes every call a connection error; `lose_responses` stores a batch and then loses
    the answer (a read timeout) that many times; `status` answers every batch with that code;
    `refuse` refuses a batch holding any measurement it is true of, naming those (as the real
    server does) unless `name_refused` is False.
    """

    def __init__(self) -> None:
        self.fabrics: dict[str, dict] = {}
        self.batches: dict[str, int] = {}
        self.measurements = 0
        self.down = False
        self.lose_responses = 0
        self.status: int | None = None
        self.posts = 0
        self.pins: dict[str, dict] = {}
        self.refuse: Callable[[dict], bool] | None = None
        self.name_refused = True
        self._lock = threading.Lock()
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            if self.down:
                raise httpx.ConnectError("connection refused", request=request)
            path = request.url.path
            if request.method == "PUT" and path.startswith("/v1/fabrics/"):
                fabric_id = path.rsplit("/", 1)[1]
                created = fabric_id not in self.fabrics
                self.fabrics[fabric_id] = json.loads(request.content)
                return httpx.Response(201 if created else 200, json={**self.fabrics[fabric_id], "fabric_id": fabric_id})
            if path == "/v1/measurements":
                return self._batch(request)
            if path == "/v1/recommend":
                body = json.loads(request.content)
                if body["fabric_id"] not in self.fabrics:
                    return httpx.Response(404, json={"detail": "unknown fabric"})
                key = body.get("job_id")
                if key not in self.pins or body.get("refresh"):
                    self.pins[key] = {"recommendations": [], "tuner_config": "",
                                      "env": {"NCCL_ALGO": "allreduce:ring", "X_CONTEXTS": str(len(body["contexts"]))}}
                return httpx.Response(200, json=self.pins[key])
            return httpx.Response(404, json={"detail": "no route"})

    def _batch(self, request: httpx.Request) -> httpx.Response:
        self.posts += 1
        if self.status is not None:
            return httpx.Response(self.status, json={"detail": [{"loc": ["body"], "msg": "refused"}]})
        body = json.loads(request.content)
        if body["fabric_id"] not in self.fabrics:
            return httpx.Response(404, json={"detail": "unknown fabric"})
        refused = [i for i, m in enumerate(body["measurements"]) if self.refuse is not None and self.refuse(m)]
        if refused:
            named = [["body", "measurements", i, "config"] if self.name_refused else ["body"] for i in refused]
            return httpx.Response(422, json={"detail": [{"loc": loc, "msg": "bad config"} for loc in named]})
        duplicate = body["batch_id"] in self.batches
        if not duplicate:
            self.batches[body["batch_id"]] = len(body["measurements"])
            self.measurements += len(body["measurements"])
        if self.lose_responses > 0:
            self.lose_responses -= 1
            raise httpx.ReadTimeout("response lost", request=request)
        accepted = 0 if duplicate else len(body["measurements"])
        return httpx.Response(202, json={"accepted": accepted, "duplicate_batch": duplicate})


@pytest.fixture
def fake_server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def make_measurement():
    return measurement


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DynamICCL's tuner plugin, compiled once for a test module (skipped without a C compiler)."""
    try:
        return build(out_dir=tmp_path_factory.mktemp("plugin")).path
    except NoCompiler as error:
        pytest.skip(f"no C compiler: {error}")

"""The agent's local API, used by the torch hook and the launcher on the same node.

`POST /local/v1/measurements`, `POST /local/v1/recommend`,
`POST /local/v1/plugin/register` and `/unregister` (plugin-mode jobs tuned
online, see plugin_online), `POST /local/v1/jobs/{job_id}/ended` (what the
agent received from a job, asked by the launch when the job exits),
`GET /healthz`, `GET /metrics`. Malformed input is a 422 naming the field (and counted);
nothing a caller sends can stop the agent. Measurements of configs the fabric
cannot run are a 422 naming each of them, with `accepted` counting the others,
which are taken.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Path, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from dynamiccl import __version__
from dynamiccl.schemas import (
    MAX_BATCH_MEASUREMENTS,
    MAX_CONTEXTS,
    Measurement,
    OptionalId,
    RecommendResponse,
    WeightedContext,
)

from dynamiccl.agent.daemon import Agent
from dynamiccl.agent.plugin_online import PluginJob, RegistrationError


class LocalMeasurements(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: OptionalId | None = None
    measurements: Annotated[list[Measurement], Field(max_length=MAX_BATCH_MEASUREMENTS)]


class LocalAccepted(BaseModel):
    accepted: int


class LocalRecommendRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: OptionalId
    contexts: Annotated[list[WeightedContext], Field(min_length=1, max_length=MAX_CONTEXTS)] | None = None
    refresh: bool = False


class PluginRegistration(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: OptionalId
    rules_file: Annotated[str, Field(min_length=1, max_length=4096)]
    round_calls: Annotated[int, Field(ge=1, le=1 << 40)]


class PluginRegistered(BaseModel):
    rules_file: str
    next_round: int


class PluginUnregistration(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rules_file: Annotated[str, Field(min_length=1, max_length=4096)]


class JobReport(BaseModel):
    job_id: str
    measurements: int
    calls: int
    contexts: int


class LocalRecommendResponse(RecommendResponse):
    source: Literal["server", "cache", "default"]
    reason: str


def create_app(agent: Agent, manage_agent: bool = True) -> FastAPI:
    """The local app; with `manage_agent` its lifespan starts and stops the agent's threads."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_agent:
            agent.start()
        try:
            yield
        finally:
            if manage_agent:
                agent.stop()

    app = FastAPI(title="DynamICCL node agent", version=__version__, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> Response:
        agent.metrics.bad_requests.inc()
        return await request_validation_exception_handler(request, error)

    @app.post("/local/v1/measurements", status_code=202, response_model=LocalAccepted)
    def measurements(body: LocalMeasurements) -> Response:
        ingested = agent.ingest(body.measurements, job_id=body.job_id)
        if not ingested.refused:
            return JSONResponse(LocalAccepted(accepted=ingested.accepted).model_dump(), status_code=202)
        detail = [
            {"type": "invalid_config", "loc": ["body", "measurements", r.index, "config"], "msg": r.reason}
            for r in ingested.refused
        ]
        return JSONResponse({"detail": detail, "accepted": ingested.accepted}, status_code=422)

    @app.post("/local/v1/recommend")
    def recommend(body: LocalRecommendRequest) -> LocalRecommendResponse:
        answer = agent.recommend(body.job_id, body.contexts, body.refresh)
        return LocalRecommendResponse(
            **answer.response.model_dump(), source=answer.source, reason=answer.reason
        )

    @app.post("/local/v1/plugin/register", status_code=201)
    def plugin_register(body: PluginRegistration) -> PluginRegistered:
        job = PluginJob(job_id=body.job_id, rules_file=FilePath(body.rules_file), round_calls=body.round_calls)
        try:
            publisher = agent.online.register(job)
        except RegistrationError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return PluginRegistered(rules_file=body.rules_file, next_round=publisher.next_round)

    @app.post("/local/v1/plugin/unregister")
    def plugin_unregister(body: PluginUnregistration) -> dict[str, bool]:
        if not agent.online.unregister(FilePath(body.rules_file)):
            raise HTTPException(status_code=404, detail=f"{body.rules_file} is not registered")
        return {"unregistered": True}

    @app.post("/local/v1/jobs/{job_id:path}/ended")
    def job_ended(job_id: Annotated[str, Path(min_length=1, max_length=128)]) -> JobReport:
        summary = agent.job_ended(job_id)
        return JobReport(job_id=job_id, measurements=summary.measurements, calls=summary.calls,
                         contexts=summary.contexts)

    @app.get("/healthz")
    def healthz() -> dict[str, object]:
        return agent.health()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(agent.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app

"""The agent's local API (the contract: `dynamiccl.agent_api`), used by the jobs on its node.

Malformed input is a 422 naming the field (and counted); nothing a caller sends can stop the
agent. Measurements of configs the fabric cannot run are a 422 naming each of them, with
`accepted` counting the others, which are taken.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import FastAPI, HTTPException, Path, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from dynamiccl import __version__
from dynamiccl.agent.daemon.agent import Agent
from dynamiccl.agent.plugin.online import RegistrationError
from dynamiccl.agent_api import (
    JOBS_PATH,
    MEASUREMENTS_PATH,
    RECOMMEND_PATH,
    REGISTER_PATH,
    UNREGISTER_PATH,
    JobReport,
    LocalAccepted,
    LocalMeasurements,
    LocalRecommendRequest,
    LocalRecommendResponse,
    PluginRegistered,
    PluginRegistration,
    PluginUnregistration,
)


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

    @app.post(MEASUREMENTS_PATH, status_code=202, response_model=LocalAccepted)
    def measurements(body: LocalMeasurements) -> Response:
        ingested = agent.ingest(body.measurements, job_id=body.job_id)
        if not ingested.refused:
            return JSONResponse(LocalAccepted(accepted=ingested.accepted).model_dump(), status_code=202)
        detail = [
            {"type": "invalid_config", "loc": ["body", "measurements", r.index, "config"], "msg": r.reason}
            for r in ingested.refused
        ]
        return JSONResponse({"detail": detail, "accepted": ingested.accepted}, status_code=422)

    @app.post(RECOMMEND_PATH)
    def recommend(body: LocalRecommendRequest) -> LocalRecommendResponse:
        answer = agent.recommend(body.job_id, body.contexts, body.refresh)
        return LocalRecommendResponse(
            **answer.response.model_dump(), source=answer.source, reason=answer.reason
        )

    @app.post(REGISTER_PATH, status_code=201)
    def plugin_register(body: PluginRegistration) -> PluginRegistered:
        try:
            publisher = agent.online.register(body.job_id, body.rules, body.round_calls)
        except RegistrationError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return PluginRegistered(rules_file=str(publisher.job.rules_file), next_round=publisher.next_round)

    @app.post(UNREGISTER_PATH)
    def plugin_unregister(body: PluginUnregistration) -> dict[str, bool]:
        if not agent.online.unregister(FilePath(body.rules_file)):
            raise HTTPException(status_code=404, detail=f"{body.rules_file} is not registered")
        return {"unregistered": True}

    @app.post(JOBS_PATH + "/{job_id:path}/ended")
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

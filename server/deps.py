"""FastAPI dependencies of the v1 routes: what `create_app` put on the app, per request.

They are `async`: FastAPI runs a plain `def` dependency on its thread pool, a thread hop per
dependency per request for what is an attribute read."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dynamiccl.server.learner import Tuner
from dynamiccl.server.metrics import ServerMetrics
from dynamiccl.server.storage import Store


async def store_of(request: Request) -> Store:
    return request.app.state.store


async def tuner_of(request: Request) -> Tuner:
    return request.app.state.tuner


async def metrics_of(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def client_of(request: Request) -> str | None:
    return request.state.client


StoreDep = Annotated[Store, Depends(store_of)]
TunerDep = Annotated[Tuner, Depends(tuner_of)]
MetricsDep = Annotated[ServerMetrics, Depends(metrics_of)]

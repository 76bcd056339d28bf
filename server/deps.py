"""FastAPI dependencies of the v1 routes: what `create_app` put on the app, per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dynamiccl.server.learner import Tuner
from dynamiccl.server.metrics import ServerMetrics
from dynamiccl.server.storage import Store


def store_of(request: Request) -> Store:
    return request.app.state.store


def tuner_of(request: Request) -> Tuner:
    return request.app.state.tuner


def metrics_of(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def client_of(request: Request) -> str | None:
    return request.state.client


StoreDep = Annotated[Store, Depends(store_of)]
TunerDep = Annotated[Tuner, Depends(tuner_of)]
MetricsDep = Annotated[ServerMetrics, Depends(metrics_of)]

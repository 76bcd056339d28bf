"""The v1 endpoints (shared/design/API.md). Handlers stay thin: store, tuner and pins do the work."""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from dynamiccl.nccl.space import InvalidConfig, check_config
from dynamiccl.schemas import (
    FABRIC_ID_PATTERN,
    BatchAccepted,
    Fabric,
    FabricOut,
    FabricStatus,
    LearnerState,
    MeasurementBatch,
    RecommendRequest,
    RecommendResponse,
    SuggestionKind,
    SuggestRequest,
    SuggestResponse,
)
from dynamiccl.server import pinning
from dynamiccl.server.auth import Caller, Scope, require
from dynamiccl.server.deps import MetricsDep, StoreDep, TunerDep, client_of
from dynamiccl.server.learner import Tuner
from dynamiccl.server.learner.compose import respond
from dynamiccl.server.metrics import ServerMetrics
from dynamiccl.server.routing import V1Route, scopes
from dynamiccl.server.storage import Store

log = logging.getLogger(__name__)
T = TypeVar("T")


class ErrorDetail(BaseModel):
    """The body of every refusal but 422's: what is wrong, in words."""

    detail: str


def _errors(*codes: int) -> dict[int | str, dict]:
    described = {
        401: "a bearer token is required and was missing or wrong",
        403: "the token lacks the scope this call needs",
        404: "unknown fabric (or a job without a pinned answer)",
        413: "request body or batch too large",
        429: "over the caller's request rate; retry after Retry-After seconds",
        503: "the database is unavailable; nothing changed, retry after Retry-After seconds",
    }
    return {code: {"model": ErrorDetail, "description": described[code]} for code in codes}


#: Refusals any /v1 call may get.
COMMON_ERRORS = (401, 403, 413, 429, 503)
router = APIRouter(prefix="/v1", route_class=V1Route, responses=_errors(*COMMON_ERRORS))
#: How long suggest and recommend wait for the learner to take in batches stored before them.
LEARNER_WAIT_S = 2.0
FabricIdPath = Annotated[str, Path(pattern=FABRIC_ID_PATTERN, description="1 to 128 of [A-Za-z0-9._:-]")]


def _fabric_or_404(store: Store, fabric_id: str) -> Fabric:
    return _known(store.get_fabric(fabric_id), fabric_id)


async def _afabric_or_404(store: Store, fabric_id: str) -> Fabric:
    """`_fabric_or_404` for a handler on the event loop."""
    return _known(await store.aget_fabric(fabric_id), fabric_id)


def _known(fabric: Fabric | None, fabric_id: str) -> Fabric:
    if fabric is None:
        raise HTTPException(status_code=404, detail=f"unknown fabric {fabric_id!r}: PUT /v1/fabrics/{fabric_id} first")
    return fabric


@router.put("/fabrics/{fabric_id}", response_model=FabricOut, status_code=200,
            responses={201: {"model": FabricOut, "description": "created"}}, openapi_extra=scopes(Scope.agent))
def put_fabric(
    fabric_id: FabricIdPath, fabric: Fabric, request: Request, response: Response, store: StoreDep
) -> FabricOut:
    """Agents register their fabric (create, or re-register it unchanged); changing a registered
    fabric's hardware needs an admin token: it resets what the server learned of it."""
    caller: Caller = request.state.caller
    if not caller.allows({Scope.admin}):
        existing = store.get_fabric(fabric_id)
        if existing is not None and existing != fabric:
            require(caller, frozenset({Scope.admin}), f"change registered fabric {fabric_id!r}")
    if store.put_fabric(fabric_id, fabric):
        response.status_code = status.HTTP_201_CREATED
    return FabricOut(**fabric.model_dump(), fabric_id=fabric_id)


@router.get("/fabrics/{fabric_id}", response_model=FabricStatus, responses=_errors(404),
            openapi_extra=scopes(Scope.read))
def get_fabric(fabric_id: FabricIdPath, store: StoreDep, tuner: TunerDep, metrics: MetricsDep) -> FabricStatus:
    fabric = _fabric_or_404(store, fabric_id)
    count, contexts = store.fabric_counts(fabric_id)
    metrics.contexts.labels(fabric_id).set(contexts)
    return FabricStatus(
        **fabric.model_dump(), fabric_id=fabric_id, measurements=count, contexts=contexts,
        learner=tuner.describe(fabric_id, fabric),
    )


@router.post("/measurements", response_model=BatchAccepted, status_code=202, responses=_errors(404),
             openapi_extra=scopes(Scope.agent))
def post_measurements(
    batch: MeasurementBatch, request: Request, store: StoreDep, tuner: TunerDep, metrics: MetricsDep
) -> BatchAccepted:
    fabric = _fabric_or_404(store, batch.fabric_id)
    _check_configs(fabric, batch)
    stored = store.add_batch(batch.fabric_id, batch.batch_id, batch.measurements, client_of(request))
    if not stored:
        metrics.batches.labels("duplicate").inc()
        return BatchAccepted(accepted=0, duplicate_batch=True)
    metrics.batches.labels("accepted").inc()
    metrics.measurements_ingested.inc(len(batch.measurements))
    metrics.observe_measured(batch.fabric_id, batch.measurements)
    try:
        tuner.observe(batch.fabric_id, fabric, batch.measurements)
    except Exception:  # the batch is stored; learning from it later is the tuner's business
        metrics.observe_errors.inc()
        log.exception("tuner failed to observe batch %s", batch.batch_id)
    return BatchAccepted(accepted=len(batch.measurements), duplicate_batch=False)


def _check_configs(fabric: Fabric, batch: MeasurementBatch) -> None:
    """A measurement of a config the fabric cannot run is a client error: refuse the batch. What
    a config can run on does not depend on the message size, so each kind of call is checked
    once per batch."""
    verdicts: dict[tuple, str | None] = {}
    errors = []
    for index, measurement in enumerate(batch.measurements):
        context, config = measurement.context, measurement.config
        shape = (context.collective, context.nranks, context.nnodes, config.algo, config.proto, config.nchannels)
        if shape not in verdicts:
            try:
                check_config(fabric, context, config)
                verdicts[shape] = None
            except InvalidConfig as error:
                verdicts[shape] = str(error)
        if (reason := verdicts[shape]) is not None:
            errors.append({"type": "invalid_config", "loc": ("body", "measurements", index, "config"), "msg": reason})
    if errors:
        raise RequestValidationError(errors[:20])


async def _taken_in(store: Store, tuner: Tuner, fabric_id: str, fabric: Fabric, metrics: ServerMetrics,
                    answer: Callable[[], T], with_model: bool = False) -> tuple[LearnerState, T]:
    """Reading your own writes: `answer()` (the tuner's part of the reply) once the learner has
    taken in every batch stored before the request, waiting at most LEARNER_WAIT_S (the state
    says `behind` when it could not); `with_model` for an answer the tuner's model steers
    (`Tuner.catch_up`). When it has already, the common case, `answer` runs here on
    the event loop: it looks up decisions made once per snapshot (a context never asked before is
    decided there, once), and under concurrent clients a thread-pool hop per request costs more
    than that (every hop contends for the GIL). Catching up, and the answer after it, run on the
    thread pool.

    It first yields to the event loop once. An answer made in place runs to its end without
    yielding, so the requests read in one poll of the sockets were answered together, and one
    that arrived meanwhile waited for all of them before its own poll's turn: p99 twice the p50
    under 20 clients. Yielding puts it in the loop's queue behind those that came before it."""
    await asyncio.sleep(0)
    target = await store.alast_measurement_id(fabric_id)
    if tuner.caught_up(fabric_id, fabric, target):
        return _learner_state(tuner, fabric_id, fabric, metrics, caught_up=True), answer()

    def catch_up_and_answer() -> tuple[LearnerState, T]:
        caught_up = tuner.catch_up(fabric_id, fabric, LEARNER_WAIT_S, target, with_model)
        return _learner_state(tuner, fabric_id, fabric, metrics, caught_up), answer()

    return await run_in_threadpool(catch_up_and_answer)


def _learner_state(tuner: Tuner, fabric_id: str, fabric: Fabric, metrics: ServerMetrics,
                   caught_up: bool) -> LearnerState:
    if not caught_up:
        metrics.learner_behind.inc()
    described = tuner.describe(fabric_id, fabric)
    metrics.configs_withdrawn.labels(fabric_id).set(described.get("configs_withdrawn", 0))
    return LearnerState(measurements_learned=described.get("measurements_learned", 0), behind=not caught_up)


@router.post("/suggest", response_model=SuggestResponse, responses=_errors(404), openapi_extra=scopes(Scope.agent))
async def suggest(body: SuggestRequest, store: StoreDep, tuner: TunerDep, metrics: MetricsDep) -> Response:
    fabric = await _afabric_or_404(store, body.fabric_id)
    seed = pinning.suggestion_seed(body.fabric_id, body.job_id, body.round)
    learner, picks = await _taken_in(store, tuner, body.fabric_id, fabric, metrics,
                                     lambda: tuner.suggest(body.fabric_id, fabric, body.contexts, seed),
                                     with_model=True)
    if body.job_id is not None and body.round is not None:
        suggestions = await pinning.pinned_suggestions(store, body.fabric_id, body.job_id, body.round,
                                                       body.contexts, picks)
    else:
        suggestions = pinning.fresh_suggestions(body.contexts, picks)
    kinds = Counter(s.kind for s in suggestions)
    for kind, count in kinds.items():
        metrics.suggestions.labels(kind.value).inc(count)
    metrics.exploration_share.set(kinds[SuggestionKind.explore] / len(suggestions))
    return _json(SuggestResponse(suggestions=suggestions, learner=learner))


@router.post("/recommend", response_model=RecommendResponse, responses=_errors(404),
             openapi_extra=scopes(Scope.agent, Scope.read))
async def recommend(body: RecommendRequest, request: Request, store: StoreDep, tuner: TunerDep,
                    metrics: MetricsDep) -> Response:
    if body.refresh:  # re-pinning changes what every later launch of the job runs
        require(request.state.caller, frozenset({Scope.agent}), "re-pin a job's recommendation (refresh)")
    fabric = await _afabric_or_404(store, body.fabric_id)
    if body.job_id is not None and not body.refresh:
        pinned = await run_in_threadpool(pinning.pinned_recommendation, store, body.fabric_id, body.job_id)
        if pinned is not None:
            return _json(pinned)
    if not body.contexts:
        raise HTTPException(status_code=404, detail=f"job {body.job_id!r} has no pinned recommendation yet: send its contexts")
    learner, decisions = await _taken_in(store, tuner, body.fabric_id, fabric, metrics,
                                         lambda: tuner.recommend(body.fabric_id, fabric, body.contexts))
    answer = respond(body.contexts, decisions).model_copy(update={"learner": learner})
    metrics.predicted_speedup.labels(body.fabric_id).set(_weighted_speedup(body, answer))
    if body.job_id is None:
        return _json(answer)
    return _json(await run_in_threadpool(pinning.pin_recommendation, store, body.fabric_id, body.job_id, answer,
                                         body.refresh))


def _json(body: BaseModel | str) -> Response:
    """An answer already serialised (a pinned one is stored as JSON): FastAPI would validate and
    serialise the model again. `response_model` still documents it."""
    return Response(body if isinstance(body, str) else body.model_dump_json(), media_type="application/json")


def _weighted_speedup(body: RecommendRequest, answer: RecommendResponse) -> float:
    weights = [c.weight for c in body.contexts]
    total = sum(weights)
    if total <= 0:
        return 1.0
    logs = sum(w * math.log(max(r.speedup, 1e-9)) for w, r in zip(weights, answer.recommendations))
    return math.exp(logs / total)

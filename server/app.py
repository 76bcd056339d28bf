"""The FastAPI application factory (`uvicorn --factory dynamiccl.server.app:create_app`)."""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Response
from sqlalchemy.exc import SQLAlchemyError

from dynamiccl import __version__
from dynamiccl.server import errors
from dynamiccl.server.auth import TOKENS_FILE_ENV, Token, TokenAuth, load_tokens
from dynamiccl.server.limits import RateLimit, RateLimiter
from dynamiccl.server.learner import Tuner, make_tuner
from dynamiccl.server.metrics import RequestMetrics, ServerMetrics
from dynamiccl.server.routes import router
from dynamiccl.server.storage import Store, env_number, open_store

log = logging.getLogger("dynamiccl.server")
DEFAULT_DATABASE_URL = "sqlite:///dynamiccl.db"
DATABASE_ENV = "DYNAMICCL_DATABASE_URL"
RETENTION_ENV = "DYNAMICCL_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 30.0
#: How many new objects set off a collection of the youngest generation (CPython's default: 700).
#: The learner holds hundreds of thousands of objects; at the default, the objects of the
#: requests in flight reached the oldest generation fast enough to set off a full collection
#: (200 ms, every object the learner holds) about every second under 20 concurrent clients on
#: PostgreSQL, and each one stalled every request in flight.
GC_YOUNG_THRESHOLD = 10_000


def database_url_from_env() -> str:
    return os.environ.get(DATABASE_ENV, DEFAULT_DATABASE_URL)


def retention_from_env() -> float | None:
    """How long (s) measurements are kept whole: $DYNAMICCL_RETENTION_DAYS (default 30), `forever`
    to keep them all. Older ones the learner holds no sample of are compacted into counts."""
    if os.environ.get(RETENTION_ENV, "").strip().lower() == "forever":
        return None
    return env_number(RETENTION_ENV, DEFAULT_RETENTION_DAYS) * 86400.0


def masked(url: str) -> str:
    """The URL with any password hidden, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def create_app(
    store: Store | None = None,
    tuner: Tuner | None = None,
    tokens: Mapping[str, str | Token] | None = None,
    database_url: str | None = None,
    rate_limit: RateLimit | None = None,
) -> FastAPI:
    """Build the server. Without arguments it reads DYNAMICCL_DATABASE_URL, DYNAMICCL_TOKENS_FILE,
    DYNAMICCL_TOKENS, DYNAMICCL_RATE_LIMIT, DYNAMICCL_RATE_BURST and DYNAMICCL_RETENTION_DAYS, and opens `dynamiccl.db` in
    the working directory by default. `tokens` maps names to tokens (a plain string gets the
    default scopes, agent and read); `rate_limit` None reads the environment (no limit unless
    DYNAMICCL_RATE_LIMIT is set)."""
    if store is None:
        store = open_store(database_url or database_url_from_env())
    if tokens is None:
        tokens_file = os.environ.get(TOKENS_FILE_ENV)
        tokens = load_tokens(Path(tokens_file) if tokens_file else None)
    metrics = ServerMetrics()
    if tuner is None:
        tuner = make_tuner(store, on_refit=metrics.observe_refit, retention_s=retention_from_env(),
                           on_compact=metrics.observe_compaction)
    auth = TokenAuth(tokens)
    rate_limit = rate_limit or RateLimit.from_env()
    limiter = RateLimiter(rate_limit) if rate_limit else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        if auth.enabled:
            log.info("auth on: %d token(s) accepted for /v1", len(tokens))
        else:
            log.warning("auth off: no tokens configured, the /v1 API is open to anyone who can reach it. "
                        "Without tokens the source of a measurement is the job id its client chose, so "
                        "one client can speak as many sources: the learner's quorum of independent "
                        "sources (see the README's trust model) then protects nothing; give each agent "
                        "its own token")
        if rate_limit:
            log.info("rate limit: %g requests/s per client, bursts of %d", rate_limit.rate, rate_limit.burst)
        yield
        tuner.close()
        await store.aclose()

    app = FastAPI(title="DynamICCL tuning server", version=__version__, lifespan=lifespan)
    app.state.store, app.state.tuner, app.state.metrics, app.state.auth = store, tuner, metrics, auth
    app.state.limiter = limiter
    metrics.fabrics.set_function(lambda: _count_fabrics(store))
    app.include_router(router)
    errors.install(app)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _count_fabrics(store: Store) -> float:
    """Fabrics known, or NaN while the database is unreachable (/metrics keeps answering)."""
    try:
        return len(store.list_fabrics())
    except SQLAlchemyError:
        return math.nan

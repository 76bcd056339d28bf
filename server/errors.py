"""Error answers: every bad input gets a 4xx naming what is wrong, never a 500; a database that
cannot be reached is a 503 with Retry-After (limits.py answers 413 and 429)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from dynamiccl.schemas import MAX_BATCH_MEASUREMENTS
from dynamiccl.server.limits import BodySizeLimit

log = logging.getLogger(__name__)

#: Seconds a client is asked to wait when the database cannot be reached.
DATABASE_RETRY_AFTER_S = 5


def _is_oversize_batch(error: dict) -> bool:
    return error.get("type") == "too_long" and tuple(error.get("loc", ())) == ("body", "measurements")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
    for error in errors:
        error.pop("input", None)  # never echo (possibly huge or hostile) input back
        error.pop("url", None)
    if any(_is_oversize_batch(e) for e in errors):
        return JSONResponse(
            status_code=413,
            content={"detail": f"a batch holds at most {MAX_BATCH_MEASUREMENTS} measurements"},
        )
    return JSONResponse(status_code=422, content={"detail": errors})


async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database is down or unreachable: nothing was stored, the client should retry."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    reason = lines[0][:200] if lines else type(exc).__name__
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, reason)
    full = any(sign in reason.lower() for sign in ("full", "no space left"))  # SQLite's, PostgreSQL's words
    return JSONResponse(
        status_code=503,
        content={"detail": f"the database is {'full' if full else 'unavailable'}; nothing was changed, retry later"},
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"detail": "internal server error"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    for unavailable in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(unavailable, database_unavailable)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(BodySizeLimit)

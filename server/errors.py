"""Error answers: every bad input gets a 4xx naming what is wrong, never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dynamiccl.schemas import MAX_BATCH_MEASUREMENTS

log = logging.getLogger(__name__)

#: Largest request body accepted: a full batch of verbose measurements fits several times over.
MAX_BODY_BYTES = 32 * 1024 * 1024


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


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content={"detail": "internal server error"})


class BodySizeLimit:
    """ASGI middleware: refuses bodies over `limit` bytes with 413 before reading them whole."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(status_code=413, content={"detail": f"request body over {self.limit} bytes"})
        await response({"type": "http"}, None, send)  # type: ignore[arg-type]


class _TooLarge(Exception):
    pass


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(BodySizeLimit)

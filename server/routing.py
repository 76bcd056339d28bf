"""The route class of the /v1 API: authenticate first, then parse the body as strict JSON.

Python's `json` accepts `NaN` and `Infinity`, raises `RecursionError` on deep nesting and
`ValueError` on integers of more than 4,300 digits. Here each of these becomes a
`json.JSONDecodeError`, which FastAPI answers with its usual 422 (`json_invalid`), so no body
reaches a handler, or a 500, unless it is plain JSON. Authentication runs before the body is
read, so a caller without a valid token learns nothing about what it sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON: numbers must be finite")


def strict_loads(body: bytes) -> Any:
    """`json.loads` that only accepts standard JSON; every refusal is a `JSONDecodeError`."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("JSON nested too deeply", "", 0) from None
    except ValueError as error:  # NaN/Infinity, over-long integers, bad UTF-8
        raise json.JSONDecodeError(str(error), "", 0) from None


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class V1Route(APIRoute):
    """Authenticates with `app.state.auth` (the token's name lands in `request.state.client`)
    and hands the handler a `StrictJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            request.state.client = request.app.state.auth(request)
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler

"""The route class of the /v1 API: authenticate, check the token's scope and the caller's rate,
then parse the body as strict JSON.

Python's `json` accepts `NaN` and `Infinity`, raises `RecursionError` on deep nesting and
`ValueError` on integers of more than 4,300 digits. Here each of these becomes a
`json.JSONDecodeError`, which FastAPI answers with its usual 422 (`json_invalid`), so no body
reaches a handler, or a 500, unless it is plain JSON. Nesting deeper than `MAX_JSON_DEPTH` is
refused the same way. Authentication, scope and rate run before the body is read, so a caller
without a valid token learns nothing about what it sent and a throttled one costs no parsing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from dynamiccl.server.auth import Scope, require

#: Deepest JSON nesting accepted; the deepest valid body (a batch) nests 4 levels.
MAX_JSON_DEPTH = 32
SCOPES_KEY = "x-scopes"


def scopes(*needed: Scope) -> dict[str, list[str]]:
    """`openapi_extra` of a route that needs one of `needed` (documented in the OpenAPI schema)."""
    return {SCOPES_KEY: [s.value for s in needed]}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON: numbers must be finite")


def _too_deep(node: Any, limit: int, depth: int = 1) -> bool:
    """True when containers nest more than `limit` deep (recursion stops at the limit; only
    containers are visited, which keeps a batch of thousands of measurements cheap)."""
    if type(node) is dict:
        children = node.values()
    elif type(node) is list:
        children = node
    else:
        return False
    if depth > limit:
        return True
    for child in children:
        if (type(child) is dict or type(child) is list) and _too_deep(child, limit, depth + 1):
            return True
    return False


def strict_loads(body: bytes) -> Any:
    """`json.loads` that only accepts standard JSON nested at most MAX_JSON_DEPTH deep; every
    refusal is a `JSONDecodeError`."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("JSON nested too deeply", "", 0) from None
    except ValueError as error:  # NaN/Infinity, over-long integers, bad UTF-8
        raise json.JSONDecodeError(str(error), "", 0) from None
    if _too_deep(value, MAX_JSON_DEPTH):
        raise json.JSONDecodeError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "", 0)
    return value


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class V1Route(APIRoute):
    """Authenticates with `app.state.auth` (the caller lands in `request.state.caller`, its token
    name in `request.state.client`), requires the route's scopes (`scopes(...)` in
    `openapi_extra`; admin where a route names none), rate-limits with `app.state.limiter` when one is set, and hands the
    handler a `StrictJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needed = frozenset(Scope(s) for s in (self.openapi_extra or {}).get(SCOPES_KEY, [Scope.admin]))
        action = f"{'/'.join(sorted(self.methods))} {self.path}"

        async def strict_handler(request: Request) -> Response:
            caller = request.app.state.auth(request)
            require(caller, needed, action)
            request.state.caller, request.state.client = caller, caller.name
            limiter = request.app.state.limiter
            if limiter is not None:
                address = request.client.host if request.client else "unknown"
                limiter.check(caller.name or f"address {address}")
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler

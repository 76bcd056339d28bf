"""Limits on what a caller may send: the size of a request body and the rate of requests."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Largest request body accepted: a full batch of verbose measurements fits several times over.
MAX_BODY_BYTES = 32 * 1024 * 1024
RATE_ENV, BURST_ENV = "DYNAMICCL_RATE_LIMIT", "DYNAMICCL_RATE_BURST"


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


@dataclass(frozen=True)
class RateLimit:
    """A token bucket per client: `rate` requests a second on average, bursts of `burst`."""

    rate: float
    burst: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RateLimit | None:
        """DYNAMICCL_RATE_LIMIT (requests a second per client; unset or 0: no limit) and
        DYNAMICCL_RATE_BURST (default: two seconds' worth, at least 1)."""
        text = env.get(RATE_ENV, "").strip()
        try:
            rate = float(text) if text else 0.0
            burst_text = env.get(BURST_ENV, "").strip()
            burst = int(burst_text) if burst_text else max(1, math.ceil(2 * rate))
        except ValueError as error:
            raise ValueError(f"{RATE_ENV}/{BURST_ENV} must be numbers: {error}") from None
        if not math.isfinite(rate) or rate < 0 or burst < 1:
            raise ValueError(f"{RATE_ENV} must be >= 0 and {BURST_ENV} >= 1")
        return cls(rate, burst) if rate > 0 else None


class RateLimiter:
    """Token buckets per client key (token name, or address when the API is open)."""

    MAX_CLIENTS = 10_000

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self._clock = limit, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one token from `key`'s bucket, or raise 429 with the seconds until one is back."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.limit.burst), now))
            tokens = min(float(self.limit.burst), tokens + (now - last) * self.limit.rate)
            if len(self._buckets) >= self.MAX_CLIENTS:  # forget the longest idle client
                self._buckets.pop(next(iter(self._buckets)))
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return
            self._buckets[key] = (tokens, now)
        wait = max(1, math.ceil((1.0 - tokens) / self.limit.rate))
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"rate limit of {self.limit.rate:g} requests/s (burst {self.limit.burst}) exceeded",
            headers={"Retry-After": str(wait)},
        )

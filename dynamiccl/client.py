"""Typed HTTP client for the v1 API.

Every v1 call is safe to repeat (fabric PUTs replace, measurement batches
carry idempotent batch ids, suggest/recommend only read or pin), so the
client retries connection failures, timeouts, 429 and 5xx answers with
exponential backoff and jitter, honouring `Retry-After`. Other errors raise
`ApiError` carrying the server's own message.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import httpx
from pydantic import BaseModel
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from dynamiccl.schemas import (
    BatchAccepted,
    Context,
    Fabric,
    FabricOut,
    FabricStatus,
    Measurement,
    RecommendResponse,
    Suggestion,
    SuggestResponse,
    WeightedContext,
)

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class ApiError(Exception):
    """The server refused a request; `detail` is its explanation (FastAPI's `detail`)."""

    def __init__(
        self, status_code: int, detail: Any, method: str, url: str, retry_after: float | None = None
    ) -> None:
        self.status_code = status_code
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(f"{method} {url} -> {status_code}: {_describe(detail)}")

    @property
    def retryable(self) -> bool:
        return self.status_code in RETRY_STATUSES or self.status_code >= 500


def _describe(detail: Any) -> str:
    """FastAPI's 422 detail is a list of errors; name each field and what is wrong with it."""
    if isinstance(detail, list):
        parts = []
        for error in detail:
            if isinstance(error, dict):
                location = ".".join(str(p) for p in error.get("loc", ()))
                parts.append(f"{location}: {error.get('msg', error)}")
            else:
                parts.append(str(error))
        return "; ".join(parts)
    return str(detail)


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiError):
        return error.retryable
    return isinstance(error, httpx.TransportError)


class DynamicclClient:
    """Client of one DynamICCL server.

    >>> with DynamicclClient("http://127.0.0.1:8000") as api:  # doctest: +SKIP
    ...     api.recommend("dgx-a", [WeightedContext(collective="allreduce", nbytes=1 << 26,
    ...                                            nranks=16, nnodes=2)])
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        timeout: float = 10.0,
        attempts: int = 4,
        max_backoff: float = 8.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )
        self._attempts = attempts
        self._max_backoff = max_backoff

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, or the server's Retry-After when it gave one."""
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, ApiError) and error.retry_after is not None:
            return min(error.retry_after, self._max_backoff)
        return wait_exponential_jitter(multiplier=0.1, max=self._max_backoff)(state)

    def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        retrying = Retrying(
            stop=stop_after_attempt(self._attempts),
            wait=self._wait,
            retry=retry_if_exception(_is_transient),
            reraise=True,
        )
        return retrying(self._send, method, path, body)

    def _send(self, method: str, path: str, body: Any) -> httpx.Response:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            retry_after = response.headers.get("Retry-After", "")
            raise ApiError(
                response.status_code,
                detail,
                method,
                str(response.url),
                retry_after=float(retry_after) if retry_after.isdigit() else None,
            )
        return response

    @staticmethod
    def _dump(models: Sequence[BaseModel]) -> list[dict[str, Any]]:
        return [m.model_dump(mode="json", exclude_none=True) for m in models]

    def healthz(self) -> bool:
        return self._request("GET", "/healthz").json().get("status") == "ok"

    def put_fabric(self, fabric_id: str, fabric: Fabric) -> FabricOut:
        response = self._request("PUT", f"/v1/fabrics/{fabric_id}", fabric.model_dump(mode="json"))
        return FabricOut.model_validate(response.json())

    def get_fabric(self, fabric_id: str) -> FabricStatus:
        return FabricStatus.model_validate(self._request("GET", f"/v1/fabrics/{fabric_id}").json())

    def post_measurements(
        self, fabric_id: str, batch_id: str, measurements: Sequence[Measurement]
    ) -> BatchAccepted:
        body = {"fabric_id": fabric_id, "batch_id": batch_id, "measurements": self._dump(measurements)}
        return BatchAccepted.model_validate(self._request("POST", "/v1/measurements", body).json())

    def suggest(
        self,
        fabric_id: str,
        contexts: Sequence[Context],
        job_id: str | None = None,
        round: int | None = None,
    ) -> list[Suggestion]:
        body: dict[str, Any] = {"fabric_id": fabric_id, "contexts": self._dump(contexts)}
        if job_id is not None:
            body["job_id"] = job_id
        if round is not None:
            body["round"] = round
        response = self._request("POST", "/v1/suggest", body)
        return SuggestResponse.model_validate(response.json()).suggestions

    def recommend(
        self,
        fabric_id: str,
        contexts: Sequence[WeightedContext],
        job_id: str | None = None,
        refresh: bool = False,
    ) -> RecommendResponse:
        body: dict[str, Any] = {"fabric_id": fabric_id, "contexts": self._dump(contexts)}
        if job_id is not None:
            body["job_id"] = job_id
        if refresh:
            body["refresh"] = True
        return RecommendResponse.model_validate(self._request("POST", "/v1/recommend", body).json())


"""A typed client of the node agent's local API (`dynamiccl.agent_api`), over its Unix socket
or loopback. Transport failures raise `httpx.HTTPError`; answers other than success raise
`AgentError` with the agent's status and words, except where a method says otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from dynamiccl.agent_api import (
    DEFAULT_AGENT_URL,
    JOBS_PATH,
    MEASUREMENTS_PATH,
    RECOMMEND_PATH,
    REGISTER_PATH,
    UNREGISTER_PATH,
    AgentUrl,
    JobReport,
    LocalRecommendResponse,
    PluginRegistered,
)
from dynamiccl.schemas import WeightedContext


class AgentError(Exception):
    def __init__(self, status_code: int, text: str) -> None:
        super().__init__(f"the agent answered {status_code}: {text[:200]}")
        self.status_code = status_code


@dataclass(frozen=True)
class Delivery:
    """What the agent took of a batch of measurements."""

    accepted: int
    refused: int
    reason: str = ""  # why the refused ones were, in the agent's words


class AgentClient:
    def __init__(self, url: str = DEFAULT_AGENT_URL, timeout: float = 2.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        address = AgentUrl.parse(url)
        if transport is None and address.socket is not None:
            transport = httpx.HTTPTransport(uds=address.socket)
        # trust_env=False: a cluster's HTTP proxy settings must not route node-local calls away.
        # No certificate store for plain http: loading one costs tens of ms of CPU beside training.
        self._http = httpx.Client(base_url=address.base, timeout=timeout, trust_env=False, transport=transport,
                                  verify=address.base.startswith("https://"))

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def post_measurements(self, job_id: str | None, measurements: Sequence[dict[str, Any]]) -> Delivery:
        """Hand over measurements (wire dicts); a batch the agent refuses in part or whole is a
        `Delivery` saying how many it took, not an error."""
        response = self._http.post(MEASUREMENTS_PATH, json={"job_id": job_id, "measurements": list(measurements)})
        if response.status_code == 202:
            return Delivery(accepted=len(measurements), refused=0)
        accepted = _accepted(response)
        return Delivery(accepted, len(measurements) - accepted, f"{response.status_code} {response.text[:200]}")

    def recommend(self, job_id: str, contexts: Sequence[WeightedContext] | None = None,
                  refresh: bool = False) -> LocalRecommendResponse:
        body = {"job_id": job_id, "refresh": refresh,
                "contexts": None if contexts is None else [c.model_dump(mode="json") for c in contexts]}
        return LocalRecommendResponse.model_validate(self._ok(self._http.post(RECOMMEND_PATH, json=body)).json())

    def register_plugin(self, job_id: str, rules: str, round_calls: int) -> PluginRegistered:
        """Hand a job's launch rules to the agent for online tuning; the file it keeps them in."""
        body = {"job_id": job_id, "rules": rules, "round_calls": round_calls}
        return PluginRegistered.model_validate(self._ok(self._http.post(REGISTER_PATH, json=body)).json())

    def unregister_plugin(self, rules_file: str) -> bool:
        """Stop tuning the job (the agent removes its file); False when it was not registered."""
        response = self._http.post(UNREGISTER_PATH, json={"rules_file": rules_file})
        return response.status_code != 404 and bool(self._ok(response).json().get("unregistered"))

    def job_ended(self, job_id: str) -> JobReport:
        response = self._http.post(f"{JOBS_PATH}/{quote(job_id, safe='')}/ended")
        return JobReport.model_validate(self._ok(response).json())

    def health(self) -> dict[str, Any]:
        return self._ok(self._http.get("/healthz")).json()

    @staticmethod
    def _ok(response: httpx.Response) -> httpx.Response:
        if not response.is_success:
            raise AgentError(response.status_code, response.text)
        return response


def _accepted(response: httpx.Response) -> int:
    """How many measurements of a refused batch the agent took anyway (0 when it does not say)."""
    try:
        accepted = response.json().get("accepted", 0)
    except (ValueError, AttributeError):
        return 0
    return accepted if isinstance(accepted, int) else 0

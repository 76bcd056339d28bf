"""The node agent's local API: what the jobs on a node (the torch hook, `dynamiccl launch`, the
simulated feeder) and the agent say to each other, as the v1 schemas are for the server.

The agent listens on a Unix domain socket (`unix:/run/dynamiccl/agent.sock`, shared with the
node's jobs and nothing else) or on loopback (`http://127.0.0.1:7461`); `AgentUrl` reads both.

`POST /local/v1/measurements`, `POST /local/v1/recommend`, `POST /local/v1/plugin/register` and
`/unregister` (plugin-mode jobs tuned online), `POST /local/v1/jobs/{job_id}/ended` (what the
agent received from a job), `GET /healthz`, `GET /metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from dynamiccl.schemas import (
    MAX_BATCH_MEASUREMENTS,
    MAX_CONTEXTS,
    Measurement,
    OptionalId,
    RecommendResponse,
    WeightedContext,
)

#: Where jobs find their node's agent unless $DYNAMICCL_AGENT_URL says otherwise.
DEFAULT_AGENT_URL = "http://127.0.0.1:7461"
AGENT_URL_ENV = "DYNAMICCL_AGENT_URL"
UNIX_SCHEME = "unix:"

MEASUREMENTS_PATH = "/local/v1/measurements"
RECOMMEND_PATH = "/local/v1/recommend"
REGISTER_PATH = "/local/v1/plugin/register"
UNREGISTER_PATH = "/local/v1/plugin/unregister"
JOBS_PATH = "/local/v1/jobs"  # /{job_id}/ended: what the agent received from a job


def unix_socket_path(address: str) -> str | None:
    """The socket of a `unix:/path` (or `unix:///path`) address; None for any other address."""
    if not address.startswith(UNIX_SCHEME):
        return None
    path = "/" + address[len(UNIX_SCHEME):].lstrip("/")
    if path == "/":
        raise ValueError(f"{address!r} names no socket (unix:/path/agent.sock)")
    return path


@dataclass(frozen=True)
class AgentUrl:
    """An agent address: `unix:/path/agent.sock` (also `unix:///path`) or `http(s)://host:port`."""

    base: str  # what requests are sent to (a placeholder host over a socket)
    socket: str | None = None

    @classmethod
    def parse(cls, url: str) -> AgentUrl:
        socket = unix_socket_path(url)
        if socket is not None:
            return cls("http://dynamiccl-agent", socket)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"agent URL {url!r} is neither unix:/path/agent.sock nor http://host:port")
        return cls(url.rstrip("/"))


class LocalMeasurements(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: OptionalId | None = None
    measurements: Annotated[list[Measurement], Field(max_length=MAX_BATCH_MEASUREMENTS)]


class LocalAccepted(BaseModel):
    accepted: int


class LocalRecommendRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    job_id: OptionalId
    contexts: Annotated[list[WeightedContext], Field(min_length=1, max_length=MAX_CONTEXTS)] | None = None
    refresh: bool = False


AnswerSource = Literal["server", "cache", "default"]


class LocalRecommendResponse(RecommendResponse):
    source: AnswerSource
    reason: str


#: The largest rules file DynamICCL's tuner plugin reads (MAX_FILE_BYTES in its C source).
MAX_RULES_BYTES = 4 << 20


class PluginRegistration(BaseModel):
    """A plugin-mode job to tune online: its launch rules (version 0). The agent writes them into a
    rules file of its own, in a directory it owns, and rewrites only that file: no caller can
    make it write anywhere else."""

    model_config = ConfigDict(extra="ignore")

    job_id: OptionalId
    rules: Annotated[str, Field(max_length=MAX_RULES_BYTES)]
    round_calls: Annotated[int, Field(ge=1, le=1 << 40)]


class PluginRegistered(BaseModel):
    rules_file: str  # the file the job's NCCL_TUNER_CONFIG_FILE names
    next_round: int


class PluginUnregistration(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rules_file: Annotated[str, Field(min_length=1, max_length=4096)]


class JobReport(BaseModel):
    job_id: str
    measurements: int
    calls: int
    contexts: int


#: In a job's Inspector dump folder (`<dump dir>/<path_safe(job id)>`, set up by `dynamiccl launch`):
#: the job id itself, which the folder's name may have had to change.
JOB_ID_FILE = ".dynamiccl-job-id"


def path_safe(job_id: str) -> str:
    """A job id as a file-name part (rules files, Inspector dump folders): what is not a letter,
    digit or `._-` becomes `_`."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in job_id)[:128]


#: The answer that leaves every call to NCCL.
DEFAULT_ANSWER = RecommendResponse(recommendations=[], env={}, tuner_config="")


@dataclass(frozen=True)
class Answer:
    """A recommendation with where it came from and why."""

    response: RecommendResponse
    source: AnswerSource
    reason: str

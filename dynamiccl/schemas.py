"""Wire schemas of the v1 REST API (shared/design/API.md).

Every body the server accepts or returns is one of these models. Names of
collectives, algorithms and protocols are lower case on the wire and accepted
in any case. Validation errors name the field that is wrong, so a 422 tells a
client exactly what to fix.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

MAX_BATCH_MEASUREMENTS = 10_000
MAX_CONTEXTS = 1_000
MAX_NBYTES = 1 << 50  # 1 PiB: far above any real collective, small enough to stay exact in a float
MAX_NRANKS = 1 << 20
MAX_COUNT = 1 << 40
MAX_LATENCY_US = 1e12  # about 11.6 days for one collective
MIN_CHANNELS, MAX_CHANNELS = 1, 64
FABRIC_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class WireEnum(StrEnum):
    """A lower-case name on the wire, accepted in any case and with surrounding blanks (looked up
    only when the exact name misses, so the common case costs no Python call)."""

    @classmethod
    def _missing_(cls, value: object) -> WireEnum | None:
        if isinstance(value, str):
            return cls._value2member_map_.get(value.strip().lower())
        return None


class Collective(WireEnum):
    allreduce = "allreduce"
    allgather = "allgather"
    reducescatter = "reducescatter"
    broadcast = "broadcast"
    reduce = "reduce"
    alltoall = "alltoall"
    sendrecv = "sendrecv"

    @property
    def is_p2p(self) -> bool:
        """Point-to-point operations: only their channel count is a knob."""
        return self in (Collective.alltoall, Collective.sendrecv)


class Algo(WireEnum):
    ring = "ring"
    tree = "tree"
    nvls = "nvls"
    nvls_tree = "nvls_tree"
    collnet_direct = "collnet_direct"
    collnet_chain = "collnet_chain"
    pat = "pat"


class Proto(WireEnum):
    ll = "ll"
    ll128 = "ll128"
    simple = "simple"


class SuggestionKind(WireEnum):
    explore = "explore"
    exploit = "exploit"
    default = "default"


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


LowerStr = Annotated[str, BeforeValidator(_lower)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FabricId = Annotated[str, Field(pattern=FABRIC_ID_PATTERN, description="1 to 128 of [A-Za-z0-9._:-]")]
#: A client-chosen id (batch, job, suggestion): 1 to 128 characters, none of them a control
#: character (PostgreSQL's text cannot hold NUL; no id needs a tab or a newline).
OptionalId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$",
                                  description="1 to 128 characters, no control characters")]


class WireModel(BaseModel):
    """Base of all wire models: unknown fields are ignored, so newer clients keep working."""

    model_config = ConfigDict(extra="ignore", frozen=True, use_enum_values=False)


class Fabric(WireModel):
    """The hardware a communicator runs on."""

    gpu: Annotated[str, Field(min_length=1, max_length=64)]
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)]
    intra_node: Annotated[LowerStr, Field(min_length=1, max_length=64)]
    inter_node: Annotated[LowerStr, Field(min_length=1, max_length=64)] = "none"
    nics_per_node: Annotated[int, Field(ge=0, le=1024)] = 1
    nccl_version: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    sharp: bool = Field(
        default=False, description="in-network reduction (SHARP) is available: enables collnet_*"
    )


class FabricOut(Fabric):
    fabric_id: str


class FabricStatus(FabricOut):
    measurements: int
    contexts: int
    learner: dict[str, int] = Field(default_factory=dict, description="how far the learner has caught up")


class Context(WireModel):
    """One kind of collective call."""

    collective: Collective
    nbytes: Annotated[int, Field(ge=0, le=MAX_NBYTES)]
    nranks: Annotated[int, Field(ge=1, le=MAX_NRANKS)]
    nnodes: Annotated[int, Field(ge=1, le=MAX_NRANKS)]

    @model_validator(mode="after")
    def _nodes_within_ranks(self) -> Context:
        if self.nnodes > self.nranks:
            raise ValueError(f"nnodes ({self.nnodes}) must be <= nranks ({self.nranks})")
        return self

    def key(self) -> tuple[str, int, int, int]:
        """A hashable, sortable key (names are `WireEnum`s: equal to, and hashed as, their strings)."""
        return (self.collective, self.nbytes, self.nranks, self.nnodes)

    def plain(self) -> Context:
        """The call itself, without what a subclass adds (a recommendation request's weight)."""
        if type(self) is Context:
            return self
        return Context(collective=self.collective, nbytes=self.nbytes, nranks=self.nranks, nnodes=self.nnodes)

    def weighted(self, weight: float = 1.0) -> WeightedContext:
        """This call as a `/v1/recommend` context issued `weight` times a step."""
        return WeightedContext(**self.model_dump(), weight=weight)


class NcclConfig(WireModel):
    """What NCCL is told to do; a None field means NCCL decides."""

    algo: Algo | None = None
    proto: Proto | None = None
    nchannels: Annotated[int | None, Field(ge=MIN_CHANNELS, le=MAX_CHANNELS)] = None

    @property
    def is_default(self) -> bool:
        return self.algo is None and self.proto is None and self.nchannels is None

    def key(self) -> tuple[str, str, int]:
        """A hashable, sortable key ('' and 0 stand for 'NCCL decides'; names are `WireEnum`s,
        equal to and hashed as their strings)."""
        return (self.algo or "", self.proto or "", self.nchannels or 0)

    def label(self) -> str:
        if self.is_default:
            return "default"
        return "/".join(
            [
                self.algo.value if self.algo else "*",
                self.proto.value if self.proto else "*",
                str(self.nchannels) if self.nchannels else "*",
            ]
        )


DEFAULT_CONFIG = NcclConfig()


class Measurement(WireModel):
    """One observation: the mean latency of `count` operations run with `config`."""

    context: Context
    config: NcclConfig
    latency_us: Annotated[FiniteFloat, Field(gt=0, le=MAX_LATENCY_US)]
    count: Annotated[int, Field(ge=1, le=MAX_COUNT)] = 1
    source: Annotated[Literal["inspector", "torch", "bench", "sim"], BeforeValidator(_lower)]
    job_id: OptionalId | None = None
    ts: FiniteFloat | None = None
    suggestion_id: OptionalId | None = None


class MeasurementBatch(WireModel):
    fabric_id: FabricId
    batch_id: OptionalId
    measurements: Annotated[list[Measurement], Field(max_length=MAX_BATCH_MEASUREMENTS)]


class BatchAccepted(WireModel):
    accepted: int
    duplicate_batch: bool


class SuggestRequest(WireModel):
    fabric_id: FabricId
    contexts: Annotated[list[Context], Field(min_length=1, max_length=MAX_CONTEXTS)]
    job_id: OptionalId | None = None
    round: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = None


class Suggestion(WireModel):
    context: Context
    config: NcclConfig
    kind: SuggestionKind
    suggestion_id: str


class LearnerState(WireModel):
    """How much of what was stored an answer took in; `behind` when the server could not wait
    for its learner to take in every batch it had acknowledged before the request."""

    measurements_learned: int
    behind: bool = False


class SuggestResponse(WireModel):
    suggestions: list[Suggestion]
    learner: LearnerState | None = None


class WeightedContext(Context):
    weight: Annotated[FiniteFloat, Field(ge=0, le=1e12)] = 1.0


class RecommendRequest(WireModel):
    """`contexts` may be empty only for a job: then the job's pinned answer is returned."""

    fabric_id: FabricId
    contexts: Annotated[list[WeightedContext], Field(max_length=MAX_CONTEXTS)]
    job_id: OptionalId | None = None
    refresh: bool = False

    @model_validator(mode="after")
    def _contexts_or_job(self) -> RecommendRequest:
        if not self.contexts and (self.job_id is None or self.refresh):
            raise ValueError("contexts must hold at least one context (or name a job_id to get its pinned answer)")
        return self


class Recommendation(WireModel):
    context: Context
    config: NcclConfig
    predicted_latency_us: float | None
    default_latency_us: float | None
    speedup: float
    confidence: float
    samples: int


class RecommendResponse(WireModel):
    recommendations: list[Recommendation]
    env: dict[str, str]
    tuner_config: str
    learner: LearnerState | None = None


FABRIC_ID_RE = re.compile(FABRIC_ID_PATTERN)

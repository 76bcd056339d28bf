"""NCCL Inspector's vocabulary, shared by its JSON and Prometheus readers: NCCL's function names
and which of them Inspector sizes per rank."""

from __future__ import annotations

#: NCCL's function names (ncclFuncToString), lowercased without punctuation (`nccl_name`).
COLLECTIVES = {
    "allreduce": "allreduce", "allgather": "allgather", "allgatherv": "allgather",
    "reducescatter": "reducescatter", "broadcast": "broadcast", "reduce": "reduce",
    "alltoall": "alltoall", "all2all": "alltoall",
}
#: Inspector's message size is typeSize x count of the call: per rank for these (the send count
#: of an allgather, the receive count of a reducescatter, the per-peer count of an alltoall), so
#: the total that NCCL's tuner and nccl-tests count is that times n_ranks.
PER_RANK_SIZES = frozenset({"allgather", "reducescatter", "alltoall"})


def nccl_name(value: object) -> str:
    """`AllReduce`, `All2All`, `Ring_LL128`'s parts, ... as lowercase letters and digits."""
    return "".join(c for c in str(value).lower() if c.isalnum())

"""Which torch.distributed calls the hook times, and how each one's size is counted.

Sizes follow nccl-tests / NCCL Inspector (API.md): allreduce, broadcast and
reduce count the tensor; allgather the total gathered bytes; reducescatter
and alltoall the total input bytes; send/recv the message. Arguments are read
by position or keyword without `inspect.signature` (binding costs several
microseconds a call, more than the hook's whole budget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dynamiccl.schemas import Collective

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def tensor_bytes(tensor: Any) -> int:
    return int(tensor.numel()) * int(tensor.element_size())


def _arg(args: Args, kwargs: Kwargs, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


@dataclass(frozen=True)
class OpSpec:
    """One wrapped function of torch.distributed.

    `sized` returns (nbytes, a tensor whose device picks the backend) from the call's arguments.
    """

    name: str
    collective: Collective
    group_at: int
    async_at: int
    sized: Callable[[Args, Kwargs], tuple[int, Any]]

    def group(self, args: Args, kwargs: Kwargs) -> Any:
        return _arg(args, kwargs, self.group_at, "group")

    def is_async(self, args: Args, kwargs: Kwargs) -> bool:
        return bool(_arg(args, kwargs, self.async_at, "async_op", False))


def _first_tensor(name: str) -> Callable[[Args, Kwargs], tuple[int, Any]]:
    def sized(args: Args, kwargs: Kwargs) -> tuple[int, Any]:
        tensor = _arg(args, kwargs, 0, name)
        return tensor_bytes(tensor), tensor

    return sized


def _gathered_list(args: Args, kwargs: Kwargs) -> tuple[int, Any]:
    tensors: Sequence[Any] = _arg(args, kwargs, 0, "tensor_list")
    return sum(tensor_bytes(t) for t in tensors), _arg(args, kwargs, 1, "tensor")


def _output_tensor(args: Args, kwargs: Kwargs) -> tuple[int, Any]:
    output = _arg(args, kwargs, 0, "output_tensor")
    return tensor_bytes(output), output


def _input_tensor(name: str) -> Callable[[Args, Kwargs], tuple[int, Any]]:
    def sized(args: Args, kwargs: Kwargs) -> tuple[int, Any]:
        tensor = _arg(args, kwargs, 1, name)
        return tensor_bytes(tensor), tensor

    return sized


#: The collectives wrapped at `torch.distributed.X` (point-to-point is timed on the process group).
COLLECTIVE_OPS: tuple[OpSpec, ...] = (
    OpSpec("all_reduce", Collective.allreduce, 2, 3, _first_tensor("tensor")),
    OpSpec("all_gather", Collective.allgather, 2, 3, _gathered_list),
    OpSpec("all_gather_into_tensor", Collective.allgather, 2, 3, _output_tensor),
    OpSpec("reduce_scatter_tensor", Collective.reducescatter, 3, 4, _input_tensor("input")),
    OpSpec("broadcast", Collective.broadcast, 2, 3, _first_tensor("tensor")),
    OpSpec("reduce", Collective.reduce, 3, 4, _first_tensor("tensor")),
    OpSpec("all_to_all_single", Collective.alltoall, 4, 5, _input_tensor("input")),
)

#: ProcessGroup methods behind isend/irecv/send/recv/batch_isend_irecv: `(self, tensors, peer, tag)`.
P2P_METHODS: tuple[str, ...] = ("send", "recv", "recv_anysource")


def p2p_bytes(tensors: Sequence[Any]) -> int:
    return sum(tensor_bytes(t) for t in tensors)

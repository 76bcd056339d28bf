"""Which calls the hook times, and how each one's size is counted.

Every collective torch issues ends in one of the c10d dispatcher operators
(`C10D_OPS`), whoever calls it: `torch.distributed` functions, `ProcessGroup`
methods, DDP's C++ reducer, FSDP2, functional collectives (DTensor,
`torch.compile`) and the coalescing manager. The Python entry points most
calls come through (`PYTHON_FUNCTIONS`, `P2P_METHODS`) are also wrapped, as
a cheaper path to the same note (a Python kernel on the dispatcher costs
several times a Python wrapper); names a torch lacks are skipped, and its
calls still reach the operators. Sizes follow NCCL's tuner and nccl-tests (API.md):
allreduce, broadcast and reduce count the tensor; allgather the total
gathered bytes; reducescatter and alltoall the total input bytes; send/recv
the message. A coalesced call (one op over several tensors) is one call of
their total size, which is what NCCL's tuner sees when it merges them.
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


def total_bytes(tensors: Sequence[Any]) -> int:
    return sum(tensor_bytes(t) for t in tensors)


@dataclass(frozen=True)
class C10dOp:
    """One c10d operator: `sized(args)` gives (nbytes, a tensor whose device picks the backend)."""

    name: str
    collective: Collective
    group_at: int  # index of the process_group argument
    sized: Callable[[Args], tuple[int, Any]]


def _tensors(at: int) -> Callable[[Args], tuple[int, Any]]:
    """A list of tensors at `at`, counted whole."""
    return lambda args: (total_bytes(args[at]), args[at][0])


def _tensor(at: int) -> Callable[[Args], tuple[int, Any]]:
    return lambda args: (tensor_bytes(args[at]), args[at])


def _first_list(at: int) -> Callable[[Args], tuple[int, Any]]:
    """A list of lists of tensors at `at` (one list per input): the first list's total."""
    return lambda args: (total_bytes(args[at][0]), args[at][0][0])


def _all_lists(at: int) -> Callable[[Args], tuple[int, Any]]:
    return lambda args: (sum(total_bytes(ts) for ts in args[at]), args[at][0][0])


C10D_OPS: tuple[C10dOp, ...] = (
    C10dOp("allreduce_", Collective.allreduce, 1, _tensors(0)),
    C10dOp("allreduce_coalesced_", Collective.allreduce, 1, _tensors(0)),
    C10dOp("allgather_", Collective.allgather, 2, _first_list(0)),
    C10dOp("_allgather_base_", Collective.allgather, 2, _tensor(0)),
    C10dOp("allgather_coalesced_", Collective.allgather, 2, _all_lists(0)),
    C10dOp("allgather_into_tensor_coalesced_", Collective.allgather, 2, _tensors(0)),
    C10dOp("reduce_scatter_", Collective.reducescatter, 2, _first_list(1)),
    C10dOp("_reduce_scatter_base_", Collective.reducescatter, 2, _tensor(1)),
    C10dOp("reduce_scatter_tensor_coalesced_", Collective.reducescatter, 2, _tensors(1)),
    C10dOp("broadcast_", Collective.broadcast, 1, _tensors(0)),
    C10dOp("reduce_", Collective.reduce, 1, _tensors(0)),
    C10dOp("alltoall_", Collective.alltoall, 2, _tensors(1)),
    C10dOp("alltoall_base_", Collective.alltoall, 2, _tensor(1)),
    C10dOp("send", Collective.sendrecv, 1, _tensors(0)),
    C10dOp("recv_", Collective.sendrecv, 1, _tensors(0)),
    C10dOp("recv_any_source_", Collective.sendrecv, 1, _tensors(0)),
)


def _arg(args: Args, kwargs: Kwargs, index: int, name: str, default: Any = None) -> Any:
    """An argument by position or keyword (`inspect.signature` costs more than the hook's budget)."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


@dataclass(frozen=True)
class PythonOp:
    """One wrapped function of torch.distributed: `sized(args, kwargs)` as for C10dOp."""

    names: str  # "newest|older|..."
    collective: Collective
    group_at: int
    async_at: int
    sized: Callable[[Args, Kwargs], tuple[int, Any]]

    def name_in(self, module: Any) -> str | None:
        """The newest of the function's names `module` has."""
        return next((name for name in self.names.split("|") if hasattr(module, name)), None)

    def group(self, args: Args, kwargs: Kwargs) -> Any:
        return _arg(args, kwargs, self.group_at, "group")

    def is_async(self, args: Args, kwargs: Kwargs) -> bool:
        return bool(_arg(args, kwargs, self.async_at, "async_op", False))


def _named(index: int, name: str) -> Callable[[Args, Kwargs], tuple[int, Any]]:
    def sized(args: Args, kwargs: Kwargs) -> tuple[int, Any]:
        tensor = _arg(args, kwargs, index, name)
        return tensor_bytes(tensor), tensor

    return sized


def _gathered_list(args: Args, kwargs: Kwargs) -> tuple[int, Any]:
    return total_bytes(_arg(args, kwargs, 0, "tensor_list")), _arg(args, kwargs, 1, "tensor")


#: Each entry: the names one function has had, newest first; the first a torch has is wrapped
#: (an older name that survives calls its successor through the module, so it is covered too).
PYTHON_FUNCTIONS: tuple[PythonOp, ...] = (
    PythonOp("all_reduce", Collective.allreduce, 2, 3, _named(0, "tensor")),
    PythonOp("all_gather", Collective.allgather, 2, 3, _gathered_list),
    PythonOp("all_gather_single|all_gather_into_tensor", Collective.allgather, 2, 3, _named(0, "output_tensor")),
    PythonOp("reduce_scatter_single|reduce_scatter_tensor", Collective.reducescatter, 3, 4, _named(1, "input")),
    PythonOp("broadcast", Collective.broadcast, 2, 3, _named(0, "tensor")),
    PythonOp("reduce", Collective.reduce, 3, 4, _named(0, "tensor")),
    PythonOp("all_to_all_single", Collective.alltoall, 4, 5, _named(1, "input")),
)

#: ProcessGroup methods behind isend/irecv/send/recv/batch_isend_irecv: `(self, tensors, peer, tag)`.
#: (gloo's Works for these have no future, so from C++ they are counted, not timed.)
P2P_METHODS: tuple[str, ...] = ("send", "recv", "recv_anysource")

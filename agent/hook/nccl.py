"""NCCL path: CUDA-event durations from ProcessGroupNCCL, paired with sizes from the wrappers.

With `TORCH_NCCL_ENABLE_TIMING=1` set at launch, ProcessGroupNCCL times
every op with its own CUDA events and calls a completion hook with a
WorkInfo (op_type, seq, active_duration) on its hook thread: no added
synchronisation and no Python event objects on the training thread.
WorkInfo carries no size, so the hook's dispatcher kernels record one per op:
collectives (coalesced ones included: one op, one sequence number) by the
group's collective sequence number, read right after the call, so
completions may arrive in any order; point-to-point in issue order.

Hazards (shared/design/NCCL.md): enabling timing mid-run or raising inside
the hook aborts the communicator. So timing is never enabled here, and the
hook swallows and counts every error.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from dynamiccl.agent.hook.table import CallKey

#: How many sizes wait for their completion per process group before the oldest are forgotten.
MAX_PENDING = 4096

COLLECTIVE_OP_TYPES = frozenset(
    {"ALLREDUCE", "ALLGATHER", "_ALLGATHER_BASE", "REDUCE_SCATTER", "_REDUCE_SCATTER_BASE",
     "BROADCAST", "REDUCE", "ALLTOALL_BASE", "ALLTOALL"}
)
P2P_OP_TYPES = frozenset({"SEND", "RECV", "RECVANYSOURCE"})
COALESCED = "COALESCED"


def _op_name(op_type: Any) -> str:
    return getattr(op_type, "name", str(op_type)).rsplit(".", 1)[-1]


def _seconds(duration: Any) -> float:
    """active_duration is a timedelta (pybind chrono) or, in some builds, milliseconds as a float."""
    if hasattr(duration, "total_seconds"):
        return float(duration.total_seconds())
    return float(duration) / 1e3


class SizeLedger:
    """Sizes of one process group's NCCL ops, waiting for their durations."""

    def __init__(self, record: Callable[[CallKey, float], None]) -> None:
        self._record = record
        self._lock = threading.Lock()
        self._by_seq: OrderedDict[int, CallKey] = OrderedDict()
        self._p2p: deque[CallKey] = deque(maxlen=MAX_PENDING)
        self.unpaired = 0  # completions with no size to pair (or sizes that never completed)
        self.errors = 0

    def collective_issued(self, seq: int, key: CallKey) -> None:
        with self._lock:
            self._by_seq[seq] = key
            if len(self._by_seq) > MAX_PENDING:
                self._by_seq.popitem(last=False)
                self.unpaired += 1

    def p2p_issued(self, key: CallKey) -> None:
        with self._lock:
            if len(self._p2p) == self._p2p.maxlen:
                self.unpaired += 1
            self._p2p.append(key)

    def on_completion(self, info: Any) -> None:
        """The completion hook: must never raise (an exception aborts the communicator)."""
        try:
            name = _op_name(info.op_type)
            seconds = _seconds(info.active_duration)
            with self._lock:
                key = self._pair(name, int(info.seq))
            if key is None:
                self.unpaired += 1
            elif seconds > 0:
                self._record(key, seconds)
        except Exception:  # noqa: BLE001
            self.errors += 1

    def _pair(self, name: str, seq: int) -> CallKey | None:
        if name in COLLECTIVE_OP_TYPES:
            return self._by_seq.pop(seq, None)
        if name in P2P_OP_TYPES:
            return self._p2p.popleft() if self._p2p else None
        if name == COALESCED and seq in self._by_seq:
            # coalesced collectives (allreduce_coalesced_, ..._tensor_coalesced_) are one op under one seq
            return self._by_seq.pop(seq)
        if name == COALESCED and self._p2p:
            # batch_isend_irecv under NCCL coalescing completes as one op: one sendrecv of its largest message.
            batch = list(self._p2p)
            self._p2p.clear()
            return max(batch, key=lambda k: k.nbytes)
        return None


def register(group: Any, backend: Any, ledger: SizeLedger) -> str | None:
    """Attach the ledger's completion hook to an NCCL group; returns why not, or None."""
    for target in (backend, group):
        register_hook = getattr(target, "_register_on_completion_hook", None)
        if register_hook is None:
            continue
        try:
            register_hook(ledger.on_completion)
            return None
        except Exception as error:  # noqa: BLE001 - e.g. timing not enabled, or a hook already there
            return str(error)
    return "this torch build has no on-completion hook"

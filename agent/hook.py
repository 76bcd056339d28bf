"""Times every collective a training process issues and reports it to the node agent.

    from dynamiccl.agent import hook
    profiler = hook.install(job_id="llama8b-0412")   # before or after init_process_group
    model = DDP(model); hook.register_ddp_hook(model)  # DDP buckets bypass Python wrappers

What is wrapped: `torch.distributed.X` and `torch.distributed.distributed_c10d.X`
for the collectives in `hook_ops.COLLECTIVE_OPS`; point-to-point (isend,
irecv, send, recv, batch_isend_irecv) on the ProcessGroup methods they all
end in, because `isend`/`irecv` must stay the very objects `P2POp` compares
against.

How calls are timed:
- gloo (and any non-NCCL backend): wall clock in the wrapper. Blocking calls
  are timed around the call; async calls until the Work's `wait()` returns,
  `is_completed()` first says True, or its future completes.
- NCCL: ProcessGroupNCCL's own CUDA-event timing (see hook_nccl); the
  wrapper only records the op's size.

Every timed call lands in a CallTable keyed by (collective, nbytes, nranks,
nnodes, backend); a Poster thread turns each window into Measurements and
posts them to the agent. Nothing on the training path can raise because of
the hook: its own failures are counted in `Profiler.stats()`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from dynamiccl.agent import hook_nccl
from dynamiccl.agent.hook_ops import COLLECTIVE_OPS, P2P_METHODS, OpSpec, p2p_bytes
from dynamiccl.agent.hook_poster import DEFAULT_AGENT_URL, Poster
from dynamiccl.agent.hook_table import CallKey, CallTable, ConfigResolver, to_measurements
from dynamiccl.schemas import Collective

log = logging.getLogger("dynamiccl.hook")

_ORIGINAL = "__dynamiccl_original__"
_MAX_GROUPS = 1024


@dataclass(frozen=True)
class GroupInfo:
    """What the hook needs about a process group, computed once per (group, device type)."""

    member: bool
    nranks: int = 1
    nnodes: int = 1
    nccl: bool = False
    ledger: hook_nccl.SizeLedger | None = None


def _nnodes(ranks: list[int]) -> int:
    """Distinct nodes among global ranks, with torchrun's layout: node = rank // LOCAL_WORLD_SIZE."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    except ValueError:
        local = 0
    if local < 1:
        return 1
    return len({rank // local for rank in ranks})


class _TimedWork(dist.Work):
    """A gloo Work that reports its wall time once, when the caller sees it complete.

    A Python subclass of Work (so isinstance checks hold, and C++ calls
    dispatch to these overrides); everything else delegates to the real Work.
    """

    def __init__(self, inner: dist.Work, record: Callable[[float], None], start: float) -> None:
        super().__init__()
        self._inner = inner
        self._record = record
        self._start = start
        self._done = False

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._record(time.perf_counter() - self._start)

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        result = self._inner.wait(*args, **kwargs)
        self._finish()
        return result

    def is_completed(self) -> bool:
        completed = self._inner.is_completed()
        if completed:
            self._finish()
        return completed

    def get_future(self) -> torch.futures.Future:
        def done(future: torch.futures.Future) -> Any:
            self._finish()
            return future.value()

        return self._inner.get_future().then(done)


def _delegate(name: str) -> Callable[..., Any]:
    def method(self: _TimedWork, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._inner, name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in ("exception", "is_success", "result", "source_rank", "_source_rank", "synchronize",
              "boxed", "get_future_result", "_get_duration", "_get_op_type", "block_current_stream"):
    if hasattr(dist.Work, _name):
        setattr(_TimedWork, _name, _delegate(_name))


@dataclass
class Profiler:
    """The installed hook: its call table, its sender and its counters."""

    job_id: str | None
    sample_every: int
    poster: Poster = field(init=False)
    table: CallTable = field(default_factory=CallTable)
    resolver: ConfigResolver = field(default_factory=ConfigResolver.from_env)
    calls: int = 0  # calls seen by the wrappers (timed or not)
    errors: int = 0  # failures inside the hook itself, swallowed
    _groups: dict[tuple[Any, str], GroupInfo] = field(default_factory=dict)

    def stats(self) -> dict[str, int]:
        ledgers = [g.ledger for g in self._groups.values() if g.ledger is not None]
        return {
            "calls": self.calls,
            "errors": self.errors + sum(ledger.errors for ledger in ledgers),
            "nccl_unpaired": sum(ledger.unpaired for ledger in ledgers),
            "backlog": self.poster.backlog,
            **asdict(self.poster.stats),
        }

    def flush(self, timeout_s: float = 2.0) -> None:
        """Post everything recorded so far now (the sender thread does this every window)."""
        self.poster.flush(deadline=time.monotonic() + timeout_s)

    def collect(self) -> list[dict[str, Any]]:
        measurements, skipped = to_measurements(self.table.take(), self.resolver, self.job_id)
        self.poster.stats.unattributed += skipped
        return measurements

    def record(self, key: CallKey, seconds: float) -> None:
        try:
            self.table.add(key, seconds)
        except Exception:  # noqa: BLE001
            self.errors += 1

    def group_info(self, pg: Any, tensor: Any) -> GroupInfo:
        device = tensor.device.type if tensor is not None else "cpu"
        cache_key = (pg, device)
        info = self._groups.get(cache_key)
        if info is None:
            info = self._describe(pg, device)
            if len(self._groups) >= _MAX_GROUPS:
                self._groups.clear()
            self._groups[cache_key] = info
        return info

    def _describe(self, pg: Any, device: str) -> GroupInfo:
        if c10d._rank_not_in_group(pg):
            return GroupInfo(member=False)
        ranks = dist.get_process_group_ranks(pg)
        backend = pg._get_backend(torch.device(device))
        nccl_class = getattr(dist, "ProcessGroupNCCL", None)
        if nccl_class is None or not isinstance(backend, nccl_class):
            return GroupInfo(member=True, nranks=len(ranks), nnodes=_nnodes(ranks))
        ledger = hook_nccl.SizeLedger(self.record)
        why_not = hook_nccl.register(pg, backend, ledger)
        if why_not is not None:
            print(f"dynamiccl hook: NCCL calls on this group are not timed: {why_not}", file=sys.stderr)
            return GroupInfo(member=False)
        return GroupInfo(member=True, nranks=len(ranks), nnodes=_nnodes(ranks), nccl=True, ledger=ledger)


_profiler: Profiler | None = None


def _issued(profiler: Profiler, info: GroupInfo, pg: Any, key: CallKey, start: float, work: Any,
            is_async: bool, p2p: bool) -> Any:
    """After the real call: record its size (NCCL) or its wall time (gloo); returns what the caller gets."""
    if info.ledger is not None:
        if p2p:
            info.ledger.p2p_issued(key)
        else:
            info.ledger.collective_issued(pg._get_sequence_number_for_group(), key)
        return work
    if is_async:
        if work is None:
            return work
        return _TimedWork(work, functools.partial(profiler.record, key), start)
    profiler.record(key, time.perf_counter() - start)
    return work


def _wrap_collective(spec: OpSpec, original: Callable[..., Any], profiler: Profiler) -> Callable[..., Any]:
    every = profiler.sample_every
    seen = [0]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        if seen[0] % every:
            return original(*args, **kwargs)
        try:
            profiler.calls += every
            group = spec.group(args, kwargs)
            pg = group if group is not None else c10d._get_default_group()
            nbytes, tensor = spec.sized(args, kwargs)
            info = profiler.group_info(pg, tensor)
            is_async = spec.is_async(args, kwargs)
        except Exception:  # noqa: BLE001 - never let the hook break a call
            profiler.errors += 1
            return original(*args, **kwargs)
        if not info.member:
            return original(*args, **kwargs)
        start = time.perf_counter()
        work = original(*args, **kwargs)
        try:
            key = CallKey(spec.collective, nbytes, info.nranks, info.nnodes, info.nccl)
            return _issued(profiler, info, pg, key, start, work, is_async, p2p=False)
        except Exception:  # noqa: BLE001
            profiler.errors += 1
            return work

    setattr(wrapper, _ORIGINAL, original)
    return wrapper


def _wrap_p2p(original: Callable[..., Any], profiler: Profiler) -> Callable[..., Any]:
    every = profiler.sample_every
    seen = [0]

    @functools.wraps(original)
    def method(self: Any, tensors: Any, *args: Any) -> Any:
        seen[0] += 1
        if seen[0] % every:
            return original(self, tensors, *args)
        try:
            profiler.calls += every
            info = profiler.group_info(self, tensors[0])
            key = CallKey(Collective.sendrecv, p2p_bytes(tensors), info.nranks, info.nnodes, info.nccl)
        except Exception:  # noqa: BLE001
            profiler.errors += 1
            return original(self, tensors, *args)
        start = time.perf_counter()
        work = original(self, tensors, *args)
        if not info.member:
            return work
        try:
            return _issued(profiler, info, self, key, start, work, is_async=True, p2p=True)
        except Exception:  # noqa: BLE001
            profiler.errors += 1
            return work

    setattr(method, _ORIGINAL, original)
    return method


def _patch(profiler: Profiler) -> None:
    for spec in COLLECTIVE_OPS:
        original = getattr(c10d, spec.name)
        wrapper = _wrap_collective(spec, original, profiler)
        for module in (dist, c10d):
            if getattr(module, spec.name, None) is original:
                setattr(module, spec.name, wrapper)
    pg_class = c10d.ProcessGroup
    for name in P2P_METHODS:
        setattr(pg_class, name, _wrap_p2p(getattr(pg_class, name), profiler))


def _unpatch() -> None:
    for spec in COLLECTIVE_OPS:
        for module in (dist, c10d):
            current = getattr(module, spec.name, None)
            if hasattr(current, _ORIGINAL):
                setattr(module, spec.name, getattr(current, _ORIGINAL))
    pg_class = c10d.ProcessGroup
    for name in P2P_METHODS:
        current = pg_class.__dict__.get(name)
        if hasattr(current, _ORIGINAL):
            setattr(pg_class, name, getattr(current, _ORIGINAL))


def install(
    agent_url: str | None = None,
    job_id: str | None = None,
    sample_every: int = 1,
    window_s: float = 5.0,
) -> Profiler:
    """Start timing collectives in this process (idempotent: a second call returns the first profiler).

    `agent_url` defaults to $DYNAMICCL_AGENT_URL, then the agent's default
    address; `job_id` to $DYNAMICCL_JOB_ID. `sample_every=N` times one call
    in N of each kind (counts are still of timed calls).
    """
    global _profiler
    if _profiler is not None:
        return _profiler
    profiler = Profiler(job_id=job_id or os.environ.get("DYNAMICCL_JOB_ID") or None,
                        sample_every=max(1, int(sample_every)))
    url = agent_url or os.environ.get("DYNAMICCL_AGENT_URL") or DEFAULT_AGENT_URL
    profiler.poster = Poster(url, profiler.job_id, profiler.collect, window_s=window_s)
    if profiler.resolver.error:
        print(f"dynamiccl hook: NCCL calls will not be reported: the NCCL environment is not one "
              f"config ({profiler.resolver.error})", file=sys.stderr)
    _patch(profiler)
    profiler.poster.start()
    atexit.register(_close_at_exit)
    _profiler = profiler
    return profiler


def _close_at_exit() -> None:
    if _profiler is not None:
        _profiler.poster.close()


def uninstall(flush: bool = True) -> None:
    """Restore torch.distributed and stop the sender (after a last flush, unless told not to)."""
    global _profiler
    profiler, _profiler = _profiler, None
    _unpatch()
    atexit.unregister(_close_at_exit)
    if profiler is not None:
        if flush:
            profiler.poster.close()
        else:
            profiler.poster.stop()


def current() -> Profiler | None:
    return _profiler


def register_ddp_hook(ddp_model: torch.nn.parallel.DistributedDataParallel) -> bool:
    """Route DDP's gradient buckets through the timed `all_reduce` (DDP's reducer bypasses Python).

    Uses PyTorch's stock allreduce comm hook, which is numerically what DDP
    does without one; it issues each bucket with `dist.all_reduce`, so the
    installed hook times it (and on NCCL, knows its size). Returns False
    (and says why) when the model already has a comm hook.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    try:
        ddp_model.register_comm_hook(ddp_model.process_group, default_hooks.allreduce_hook)
    except RuntimeError as error:
        print(f"dynamiccl hook: DDP buckets are not timed: {error}", file=sys.stderr)
        return False
    return True

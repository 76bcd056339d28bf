"""Times every collective a training process issues and reports it to the node agent.

    from dynamiccl.agent import hook
    profiler = hook.install(job_id="llama8b-0412")   # before or after init_process_group

`dynamiccl launch` does this for an unmodified script (sitecustomize).

Where calls are seen: a Python kernel for each c10d dispatcher operator
(`ops.C10D_OPS`: `c10d::allreduce_`, `c10d::_allgather_base_`, ...),
registered at the ADInplaceOrView dispatch key, which runs before the
operator's CPU/CUDA kernel for every caller: DDP's C++ reducer, FSDP2,
functional collectives (DTensor, `torch.compile`), coalesced calls. It notes
the call and redispatches to the real kernel. The Python entry points most
calls come through (`torch.distributed` functions, the ProcessGroup
point-to-point methods behind isend/irecv/batch_isend_irecv) are wrapped as
well, a path several times cheaper than a dispatcher kernel: they note the
call themselves and run it with the kernels excluded, so nothing is counted
twice. `isend`/`irecv` stay the objects `P2POp` compares against.

How calls are timed:
- NCCL: ProcessGroupNCCL's own CUDA-event timing (see `nccl`); the hook
  only records the op's size under its sequence number.
- gloo (and any non-NCCL backend): wall time. Through a Python entry point:
  blocking calls around the call, async ones until the Work's `wait()`
  returns, `is_completed()` first says True, or its future completes. Through
  a kernel: from issue to a callback on the Work's future (start: the issue,
  or the group's previous completion if later, so queued calls do not count
  their wait); gloo's send/recv and reduce-scatter Works have no future, so
  those are counted (`untimed`), not timed, when issued from C++.

One call of a communicator is one call in `count`: only the communicator's
lowest global rank reports its calls (every rank times the same collective;
reporting from all of them would count each call nranks times).

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
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from dynamiccl.agent.hook import nccl as nccl_timing
from dynamiccl.agent.hook.ops import C10D_OPS, P2P_METHODS, PYTHON_FUNCTIONS, C10dOp, PythonOp, total_bytes
from dynamiccl.agent.hook.poster import Poster
from dynamiccl.agent.hook.table import CallKey, CallTable, ConfigResolver, to_measurements
from dynamiccl.agent_api import AGENT_URL_ENV, DEFAULT_AGENT_URL
from dynamiccl.schemas import Collective

log = logging.getLogger("dynamiccl.hook")

_ORIGINAL = "__dynamiccl_original__"
_MAX_GROUPS = 1024


@dataclass
class GroupInfo:
    """What the hook needs about a process group, computed once per (group, device type).

    `reports`: this rank is the group's lowest, the one that reports its calls.
    `last_end`: when the group's last timed gloo call completed (perf_counter)."""

    member: bool
    reports: bool = False
    nranks: int = 1
    nnodes: int = 1
    nccl: bool = False
    ledger: nccl_timing.SizeLedger | None = None
    last_end: float = 0.0


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
    calls: int = 0  # calls seen (timed or not)
    untimed: int = 0  # calls reported by this rank that nothing could time (see the module docstring)
    errors: int = 0  # failures inside the hook itself, swallowed
    #: gloo calls issued and timed by their future's callback, not completed yet: the last calls of
    #: a job can still be in flight when the process exits, and the last flush waits for them
    _in_flight: int = 0
    _in_flight_changed: threading.Condition = field(default_factory=threading.Condition, repr=False)
    #: (id of the group, device type) -> (a weak reference to the group, its GroupInfo): the hook
    #: must not keep a destroyed group alive (gloo's threads would then be torn down at interpreter
    #: exit, after the runtime they need: an abort), and an id reused by a new group is told apart.
    _groups: dict[tuple[int, str], tuple[weakref.ref, GroupInfo]] = field(default_factory=dict)

    def stats(self) -> dict[str, int]:
        ledgers = [g.ledger for _, g in self._groups.values() if g.ledger is not None]
        return {
            "calls": self.calls,
            "untimed": self.untimed,
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
        cache_key = (id(pg), device)
        cached = self._groups.get(cache_key)
        if cached is not None and cached[0]() is pg:
            return cached[1]
        info = self._describe(pg, device)
        if len(self._groups) >= _MAX_GROUPS:
            self._groups.clear()
        self._groups[cache_key] = (weakref.ref(pg), info)
        return info

    def _describe(self, pg: Any, device: str) -> GroupInfo:
        if c10d._rank_not_in_group(pg):
            return GroupInfo(member=False)
        ranks = dist.get_process_group_ranks(pg)
        reports = dist.get_rank() == min(ranks)
        info = GroupInfo(member=True, reports=reports, nranks=len(ranks), nnodes=_nnodes(ranks))
        backend = pg._get_backend(torch.device(device))
        nccl_class = getattr(dist, "ProcessGroupNCCL", None)
        if not reports or nccl_class is None or not isinstance(backend, nccl_class):
            return info
        ledger = nccl_timing.SizeLedger(self.record)
        why_not = nccl_timing.register(pg, backend, ledger)
        if why_not is not None:
            print(f"dynamiccl hook: NCCL calls on this group are not timed: {why_not}", file=sys.stderr)
            return GroupInfo(member=False)
        info.nccl, info.ledger = True, ledger
        return info

    def awaiting(self) -> None:
        """A gloo call whose future's callback will time it (`completed`) was issued."""
        with self._in_flight_changed:
            self._in_flight += 1

    def completed(self, info: GroupInfo, key: CallKey, issued: float, _future: Any) -> None:
        """A gloo Work's future is done (on gloo's thread): its time since it could start."""
        try:
            end = time.perf_counter()
            began = max(issued, info.last_end)
            info.last_end = end
            self.record(key, end - began)
        except Exception:  # noqa: BLE001
            self.errors += 1
        finally:
            with self._in_flight_changed:
                self._in_flight -= 1
                self._in_flight_changed.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the gloo calls in flight to complete (and be recorded)."""
        with self._in_flight_changed:
            return self._in_flight_changed.wait_for(lambda: self._in_flight <= 0, timeout_s)

    def close(self, timeout_s: float = 1.5) -> None:
        """The last flush, within `timeout_s`: the calls still in flight get a third of it."""
        self.drain(timeout_s / 3)
        self.poster.close(timeout_s * 2 / 3)


_profiler: Profiler | None = None
_library: torch.library.Library | None = None
_BELOW = torch._C._after_ADInplaceOrView_keyset
_OUR_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)


def _record_issue(info: GroupInfo, pg: Any, key: CallKey) -> None:
    """NCCL: the size waits for its completion, under the group's sequence number (read right
    after the call) or, point-to-point, in issue order."""
    assert info.ledger is not None
    if key.collective is Collective.sendrecv:
        info.ledger.p2p_issued(key)
    else:
        info.ledger.collective_issued(pg._get_sequence_number_for_group(), key)


# ---- the fast path: the Python entry points most calls come through


def _call_unhooked(original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The real call, with the dispatcher kernels below it skipped (this wrapper notes it)."""
    with torch._C._ExcludeDispatchKeyGuard(_OUR_KEY):
        return original(*args, **kwargs)


def _timed(profiler: Profiler, info: GroupInfo, pg: Any, key: CallKey, issued: float, work: Any,
           is_async: bool) -> Any:
    """After a wrapped call: its size (NCCL) or its wall time (gloo); returns what the caller gets."""
    if info.ledger is not None:
        _record_issue(info, pg, key)
        return work
    if is_async:
        return work if work is None else _TimedWork(work, functools.partial(profiler.record, key), issued)
    profiler.record(key, time.perf_counter() - issued)
    return work


def _wrap_function(op: PythonOp, original: Callable[..., Any], profiler: Profiler) -> Callable[..., Any]:
    every = profiler.sample_every
    seen = [0]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        info = None
        if seen[0] % every == 0:
            try:
                group = op.group(args, kwargs)
                pg = group if group is not None else c10d._get_default_group()
                nbytes, tensor = op.sized(args, kwargs)
                info = profiler.group_info(pg, tensor)
                profiler.calls += every
            except Exception:  # noqa: BLE001 - never let the hook break a call
                profiler.errors += 1
        issued = time.perf_counter()
        work = _call_unhooked(original, args, kwargs)
        if info is None or not info.reports:
            return work
        try:
            key = CallKey(op.collective, nbytes, info.nranks, info.nnodes, info.nccl)
            return _timed(profiler, info, pg, key, issued, work, op.is_async(args, kwargs))
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
        info = None
        if seen[0] % every == 0:
            try:
                info = profiler.group_info(self, tensors[0])
                key = CallKey(Collective.sendrecv, total_bytes(tensors), info.nranks, info.nnodes, info.nccl)
                profiler.calls += every
            except Exception:  # noqa: BLE001
                profiler.errors += 1
        issued = time.perf_counter()
        work = _call_unhooked(original, (self, tensors, *args), {})
        if info is None or not info.reports:
            return work
        try:
            return _timed(profiler, info, self, key, issued, work, is_async=True)
        except Exception:  # noqa: BLE001
            profiler.errors += 1
            return work

    setattr(method, _ORIGINAL, original)
    return method


# ---- everything else: a kernel on each c10d operator


def _noted(profiler: Profiler, op: C10dOp, args: tuple[Any, ...], out: Any, issued: float) -> None:
    pg = dist.ProcessGroup.unbox(args[op.group_at])
    nbytes, tensor = op.sized(args)
    info = profiler.group_info(pg, tensor)
    profiler.calls += profiler.sample_every
    if not info.reports:
        return
    key = CallKey(op.collective, nbytes, info.nranks, info.nnodes, info.nccl)
    if info.ledger is not None:
        _record_issue(info, pg, key)
        return
    work = dist.Work.unbox(out[-1] if isinstance(out, tuple | list) else out)
    try:
        future = work.get_future()
    except RuntimeError:  # gloo's send/recv and reduce-scatter: nothing says when they end
        profiler.untimed += 1
        return
    future.add_done_callback(functools.partial(profiler.completed, info, key, issued))
    profiler.awaiting()  # after: a callback run at once, or one that failed to register, leaves 0


def _kernel(op: C10dOp, overload: Any, profiler: Profiler) -> Callable[..., Any]:
    """The operator's kernel at ADInplaceOrView: the real kernel (redispatched below this key,
    the cheapest way back into the dispatcher), then the note of the call."""
    every = profiler.sample_every
    seen = [0]
    redispatch = overload.redispatch

    def kernel(keyset: Any, *args: Any) -> Any:
        issued = time.perf_counter()
        out = redispatch(keyset & _BELOW, *args)
        seen[0] += 1
        if seen[0] % every == 0:
            try:
                _noted(profiler, op, args, out, issued)
            except Exception:  # noqa: BLE001 - never let the hook break a call
                profiler.errors += 1
        return out

    return kernel


def _patch(profiler: Profiler) -> None:
    global _library
    _library = torch.library.Library("c10d", "IMPL")
    for op in C10D_OPS:
        overload = getattr(torch.ops.c10d, op.name).default
        _library.impl(op.name, _kernel(op, overload, profiler), "ADInplaceOrView", with_keyset=True)
    for function in PYTHON_FUNCTIONS:
        name = function.name_in(c10d)
        if name is None:
            continue
        original = getattr(c10d, name)
        wrapper = _wrap_function(function, original, profiler)
        for module in (dist, c10d):
            if getattr(module, name, None) is original:
                setattr(module, name, wrapper)
    pg_class = c10d.ProcessGroup
    for name in P2P_METHODS:
        if name in pg_class.__dict__:
            setattr(pg_class, name, _wrap_p2p(pg_class.__dict__[name], profiler))


def _unpatch() -> None:
    global _library
    if _library is not None:
        _library._destroy()
        _library = None
    for function in PYTHON_FUNCTIONS:
        name = function.name_in(c10d)
        for module in (dist, c10d):
            current = getattr(module, name, None) if name else None
            if hasattr(current, _ORIGINAL):
                setattr(module, name, getattr(current, _ORIGINAL))
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
    url = agent_url or os.environ.get(AGENT_URL_ENV) or DEFAULT_AGENT_URL
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
        _profiler.close()


def uninstall(flush: bool = True) -> None:
    """Restore torch.distributed and stop the sender (after a last flush, unless told not to)."""
    global _profiler
    profiler, _profiler = _profiler, None
    _unpatch()
    atexit.unregister(_close_at_exit)
    if profiler is not None:
        if flush:
            profiler.close()
        else:
            profiler.poster.stop()


def current() -> Profiler | None:
    return _profiler

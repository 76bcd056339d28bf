"""Drive the tuner plugin the way NCCL does, from Python (ctypes), without NCCL or a GPU.

Used to check a build and a rules file (what would the plugin choose for
this call?), by the tests and by the benchmark. It loads the library, takes
the exported `ncclTunerPlugin_vN` table and calls init / getCollInfo /
finalize with a cost table like NCCL's (float[algorithms][protocols],
NCCL_ALGO_PROTO_IGNORE = -1 where a pair is unavailable).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from dynamiccl.schemas import Algo, Collective, Proto

#: NCCL's indices: ncclFunc_t, then the cost table's algorithm and protocol axes.
COLLECTIVE_INDEX = {
    Collective.broadcast: 0, Collective.reduce: 1, Collective.allgather: 2,
    Collective.reducescatter: 3, Collective.allreduce: 4,
}
ALGOS = (Algo.tree, Algo.ring, Algo.collnet_direct, Algo.collnet_chain, Algo.nvls, Algo.nvls_tree, Algo.pat)
PROTOS = (Proto.ll, Proto.ll128, Proto.simple)
IGNORE = -1.0
NUM_CELLS = len(ALGOS) * len(PROTOS)

Logger = Callable[[int, int, str], None]  # (level, subsystem flags, message)

_LOGGER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p)
_TABLE = ctypes.POINTER(ctypes.c_float)
_INIT_V3 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, _LOGGER,
                            ctypes.POINTER(ctypes.c_void_p))
_INIT_V5 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint64, ctypes.c_size_t,
                            ctypes.c_size_t, _LOGGER, ctypes.c_void_p, ctypes.c_void_p)
_COLL_V3 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int, _TABLE,
                            ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int))
_COLL_V4 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int, _TABLE,
                            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int))
_FINISH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class _TunerV3(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("init", _INIT_V3), ("getCollInfo", _COLL_V3), ("destroy", _FINISH)]


class _TunerV4(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("init", _INIT_V3), ("getCollInfo", _COLL_V4), ("destroy", _FINISH)]


class _TunerV5(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("init", _INIT_V5), ("getCollInfo", _COLL_V4), ("finalize", _FINISH)]


class _TunerV6(ctypes.Structure):
    _fields_ = [*_TunerV5._fields_, ("getChunkSize", ctypes.c_void_p)]


#: v7 (NCCL 2.32.6) has v6's table; only the constants struct passed to init grows.
_STRUCTS: dict[int, type[ctypes.Structure]] = {3: _TunerV3, 4: _TunerV4, 5: _TunerV5, 6: _TunerV6, 7: _TunerV6}
EXPORTED_VERSIONS = tuple(_STRUCTS)


def cost_table(costs: dict[tuple[Algo, Proto], float] | None = None, default: float = IGNORE) -> list[float]:
    """A cost table in NCCL's layout: `costs` where given, `default` elsewhere."""
    table = [default] * NUM_CELLS
    for (algo, proto), cost in (costs or {}).items():
        table[ALGOS.index(algo) * len(PROTOS) + PROTOS.index(proto)] = cost
    return table


def full_table() -> list[float]:
    """Every pair available, with distinct costs (NCCL's cheapest: tree/ll)."""
    return [10.0 + i for i in range(NUM_CELLS)]


@dataclass(frozen=True)
class Decision:
    """What the plugin did to one call: the pair it made cheapest, or None where NCCL decides."""

    algo: Algo | None
    proto: Proto | None
    nchannels: int | None
    table: tuple[float, ...]


class Communicator:
    """One plugin context, as NCCL creates per communicator."""

    def __init__(self, tuner: TunerLibrary, nranks: int, nnodes: int, comm_id: int, log: Logger | None) -> None:
        self._tuner = tuner
        self._log = _LOGGER(lambda level, flags, file, line, fmt: log(level, flags, fmt.decode())) if log else _LOGGER()
        handle = ctypes.c_void_p()
        api = tuner.api
        if tuner.version >= 5:
            status = api.init(ctypes.byref(handle), comm_id, nranks, nnodes, self._log, None, None)
        else:
            status = api.init(nranks, nnodes, self._log, ctypes.byref(handle))
        if status != 0 or not handle.value:
            raise RuntimeError(f"plugin init failed with ncclResult_t {status}")
        self._handle: ctypes.c_void_p | None = handle
        self._cells = (ctypes.c_float * NUM_CELLS)()
        self._channels = ctypes.c_int(0)
        self._table_ptr = ctypes.cast(self._cells, _TABLE)

    def choose(self, collective: Collective, nbytes: int, table: Sequence[float] | None = None,
               pipe_ops: int = 1, reg_buff: int = 0) -> Decision:
        if self._handle is None:
            raise RuntimeError("communicator already finalized")
        before = list(full_table() if table is None else table)
        self._cells[:] = before
        self._channels.value = 0
        args = [self._handle, COLLECTIVE_INDEX[collective], nbytes, pipe_ops, self._table_ptr,
                len(ALGOS), len(PROTOS)]
        if self._tuner.version >= 4:
            args.append(reg_buff)
        status = self._tuner.api.getCollInfo(*args, ctypes.byref(self._channels))
        if status != 0:
            raise RuntimeError(f"getCollInfo returned ncclResult_t {status}")
        after = tuple(self._cells)
        picked = [i for i, (old, new) in enumerate(zip(before, after)) if old != new]
        if not picked:
            return Decision(None, None, self._channels.value or None, after)
        if len(picked) != 1 or after[picked[0]] != 0.0:
            raise AssertionError(f"the plugin changed the cost table unexpectedly: {before} -> {after}")
        index = picked[0]
        return Decision(ALGOS[index // len(PROTOS)], PROTOS[index % len(PROTOS)],
                        self._channels.value or None, after)

    def close(self) -> None:
        if self._handle is not None:
            finish = self._tuner.api.finalize if self._tuner.version >= 5 else self._tuner.api.destroy
            finish(self._handle)
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


class TunerLibrary:
    """The plugin's shared library, through the exported table of tuner API `version`."""

    def __init__(self, path: Path, version: int = 5) -> None:
        if version not in _STRUCTS:
            raise ValueError(f"tuner API v{version} is not one the plugin exports "
                             f"({EXPORTED_VERSIONS[0]} to {EXPORTED_VERSIONS[-1]})")
        self.path = path
        self.version = version
        self.library = ctypes.CDLL(str(path))
        self.api = _STRUCTS[version].in_dll(self.library, f"ncclTunerPlugin_v{version}")

    @property
    def name(self) -> str:
        return (self.api.name or b"").decode()

    def communicator(self, nranks: int, nnodes: int, comm_id: int = 0, log: Logger | None = None) -> Communicator:
        return Communicator(self, nranks, nnodes, comm_id, log)


@contextmanager
def plugin_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set variables the plugin reads at communicator init (NCCL_TUNER_CONFIG_FILE, DYNAMICCL_TUNER_*)
    for the duration, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

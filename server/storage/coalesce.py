"""Reads that are at least as new as their caller, shared by concurrent callers.

Every `/v1/suggest` and `/v1/recommend` asks the database for the fabric's
last measurement id (reading your own writes: the answer must take in every
batch stored before the request). Under 20 concurrent clients one query per
request cost more than the rest of the request together (a connection
checkout and a round trip per request, each a thread switch under the GIL).

`CoalescedRead` runs at most one read per key at a time. A caller that
arrives while one is running joins the next read, which starts after it
arrived, so every caller still gets a value read after its own call began:
the same guarantee as a read of its own, with one query for all the callers
that arrived during the previous one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Round(Generic[V]):
    """One read and the callers waiting for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: V | None = None
        self.error: BaseException | None = None

    def result(self) -> V:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class CoalescedRead(Generic[K, V]):
    """`read(key)`: `fetch(key)` as run after the call began, shared with concurrent callers."""

    def __init__(self, fetch: Callable[[K], V]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._next: dict[K, _Round[V]] = {}  # per key, the round not started yet
        self._running: dict[K, threading.Lock] = {}  # per key, held while its read runs

    def read(self, key: K) -> V:
        with self._lock:
            round_ = self._next.get(key)
            leads = round_ is None
            if leads:
                round_ = self._next[key] = _Round()
            running = self._running.setdefault(key, threading.Lock())
        if not leads:
            return round_.result()
        with running:  # the previous read of this key ends first: who arrives meanwhile joins this one
            with self._lock:
                del self._next[key]  # from here on, arrivals wait for the round after this one
            try:
                round_.value = self._fetch(key)
            except BaseException as error:  # every caller of the round sees the failure
                round_.error = error
            finally:
                round_.done.set()
        return round_.result()

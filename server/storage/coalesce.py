"""Reads that are at least as new as their caller, shared by concurrent callers.

Every `/v1/suggest` and `/v1/recommend` asks the database for the fabric's
last measurement id (reading your own writes: the answer must take in every
batch stored before the request). Those handlers run on the event loop; on
PostgreSQL the query is a round trip on an async connection, and under 20
concurrent clients a query per request cost more than the rest of the request.

`CoalescedRead` runs at most one read per key at a time. A caller that
arrives while one is running joins the next read, which starts after it
arrived, so every caller still gets a value read after its own call began:
the same guarantee as a read of its own, with one query for all the callers
that arrived during the previous one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CoalescedRead(Generic[K, V]):
    """`await read(key)`: `await fetch(key)` begun after the call, shared with the callers that
    arrive while the previous read of that key runs. One event loop at a time uses it."""

    def __init__(self, fetch: Callable[[K], Awaitable[V]]) -> None:
        self._fetch = fetch
        self._next: dict[K, asyncio.Future[V]] = {}  # per key, the read not started yet
        self._readers: dict[K, asyncio.Task[None]] = {}  # per key, the task running its reads

    async def read(self, key: K) -> V:
        future = self._next.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._next[key] = loop.create_future()
            if key not in self._readers:
                self._readers[key] = loop.create_task(self._read_while_asked(key))
        return await asyncio.shield(future)  # a caller that gives up does not cancel the others' read

    async def _read_while_asked(self, key: K) -> None:
        """Read for the callers waiting on `key`, then for those that arrived meanwhile, until none wait."""
        try:
            while (future := self._next.pop(key, None)) is not None:
                try:
                    value = await self._fetch(key)
                except Exception as error:  # every caller of the read sees the failure
                    future.set_exception(error)
                except BaseException:  # the loop is shutting down: its callers are not left waiting
                    future.cancel()
                    raise
                else:
                    future.set_result(value)
        finally:
            del self._readers[key]

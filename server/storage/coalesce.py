"""Work on the event loop shared by concurrent callers: reads, and writes made together.

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

`BatchedCall` does the same for writes: the calls that arrive while one
group is written are written together in the next, so a burst of concurrent
requests pays for one transaction and one worker-thread hop, not one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
A = TypeVar("A")


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


class BatchedCall(Generic[A, V]):
    """`await call(argument)`: its share of `await run(arguments)`, which takes the arguments of
    every call made while the previous run ran, in the order they were made, and returns one
    value each. One event loop at a time uses it."""

    def __init__(self, run: Callable[[Sequence[A]], Awaitable[Sequence[V]]]) -> None:
        self._run = run
        self._waiting: list[tuple[A, asyncio.Future[V]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def call(self, argument: A) -> V:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((argument, future))
        if self._runner is None:
            self._runner = loop.create_task(self._run_while_called())
        return await asyncio.shield(future)  # a caller that gives up does not cancel the others' run

    async def _run_while_called(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                futures = [future for _, future in group]
                try:
                    values = await self._run([argument for argument, _ in group])
                except Exception as error:  # every call of the group sees the failure
                    for future in futures:
                        future.set_exception(error)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
                else:
                    for future, value in zip(futures, values, strict=True):
                        future.set_result(value)
        finally:
            self._runner = None

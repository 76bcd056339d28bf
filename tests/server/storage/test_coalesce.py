"""CoalescedRead: concurrent callers share reads, and no caller gets a value read before it called."""

from __future__ import annotations

import asyncio

import anyio

from dynamiccl.server.storage.coalesce import CoalescedRead


class GatedSource:
    """A value read by `fetch`, which waits until the test opens its gate."""

    def __init__(self) -> None:
        self.value = 0
        self.fetches = 0
        self.started = asyncio.Semaphore(0)
        self.gate = asyncio.Semaphore(0)
        self.fail = False

    async def fetch(self, key: str) -> int:
        value = self.value  # what the database holds when the query starts
        self.fetches += 1
        self.started.release()
        await asyncio.wait_for(self.gate.acquire(), timeout=10)
        if self.fail:
            raise RuntimeError(f"database down reading {key}")
        return value


async def _started(source: GatedSource) -> None:
    await asyncio.wait_for(source.started.acquire(), timeout=10)


def test_a_caller_that_arrives_during_a_read_gets_a_later_read():
    async def scenario() -> None:
        source = GatedSource()
        reads = CoalescedRead(source.fetch)
        first = asyncio.ensure_future(reads.read("f"))
        await _started(source)  # the first read has started, with value 0
        source.value = 1  # a batch is stored; then these callers ask
        late = [asyncio.ensure_future(reads.read("f")) for _ in range(3)]
        await asyncio.sleep(0.05)
        source.gate.release()  # the first read returns what it read
        assert await first == 0
        await _started(source)  # one more read, for all three
        source.gate.release()
        assert await asyncio.gather(*late) == [1, 1, 1]
        assert source.fetches == 2

    anyio.run(scenario)


def test_keys_are_read_independently():
    async def scenario() -> None:
        source = GatedSource()
        reads = CoalescedRead(source.fetch)
        a, b = asyncio.ensure_future(reads.read("a")), asyncio.ensure_future(reads.read("b"))
        await _started(source)
        await _started(source)  # both run at once
        source.gate.release()
        source.gate.release()
        assert await a == await b == 0

    anyio.run(scenario)


def test_a_caller_that_gives_up_does_not_cancel_the_read_of_the_others():
    async def scenario() -> None:
        source = GatedSource()
        reads = CoalescedRead(source.fetch)
        leaving, staying = asyncio.ensure_future(reads.read("f")), asyncio.ensure_future(reads.read("f"))
        await _started(source)
        leaving.cancel()
        source.gate.release()
        assert await staying == 0
        assert leaving.cancelled()

    anyio.run(scenario)


def test_a_failed_read_fails_its_callers_and_the_next_read_tries_again():
    async def scenario() -> None:
        source = GatedSource()
        source.fail = True
        reads = CoalescedRead(source.fetch)
        failing = asyncio.gather(reads.read("f"), reads.read("f"), return_exceptions=True)
        await _started(source)
        source.gate.release()
        errors = await failing
        assert [str(e) for e in errors] == ["database down reading f"] * 2
        source.fail, source.value = False, 7
        source.gate.release()
        assert await reads.read("f") == 7

    anyio.run(scenario)

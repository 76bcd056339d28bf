"""CoalescedRead: concurrent callers share reads, and no caller gets a value read before it called.
BatchedCall: the calls made while a group runs run together next, each getting its own answer."""

from __future__ import annotations

import asyncio

import pytest

from dynamiccl.server.storage.coalesce import BatchedCall, CoalescedRead

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the server's loop


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

    async def wait_started(self) -> None:
        """Until a read has begun."""
        await asyncio.wait_for(self.started.acquire(), timeout=10)


@pytest.fixture
def source() -> GatedSource:
    return GatedSource()


@pytest.fixture
def reads(source: GatedSource) -> CoalescedRead[str, int]:
    return CoalescedRead(source.fetch)


async def test_a_caller_that_arrives_during_a_read_gets_a_later_read(source, reads):
    first = asyncio.ensure_future(reads.read("f"))
    await source.wait_started()  # the first read has started, with value 0
    source.value = 1  # a batch is stored; then these callers ask
    late = [asyncio.ensure_future(reads.read("f")) for _ in range(3)]
    await asyncio.sleep(0.05)
    source.gate.release()  # the first read returns what it read
    assert await first == 0
    await source.wait_started()  # one more read, for all three
    source.gate.release()
    assert await asyncio.gather(*late) == [1, 1, 1]
    assert source.fetches == 2


async def test_keys_are_read_independently(source, reads):
    a, b = asyncio.ensure_future(reads.read("a")), asyncio.ensure_future(reads.read("b"))
    await source.wait_started()
    await source.wait_started()  # both run at once
    source.gate.release()
    source.gate.release()
    assert await a == await b == 0


async def test_a_caller_that_gives_up_does_not_cancel_the_read_of_the_others(source, reads):
    leaving, staying = asyncio.ensure_future(reads.read("f")), asyncio.ensure_future(reads.read("f"))
    await source.wait_started()
    leaving.cancel()
    source.gate.release()
    assert await staying == 0
    assert leaving.cancelled()


async def test_a_failed_read_fails_its_callers_and_the_next_read_tries_again(source, reads):
    source.fail = True
    failing = asyncio.gather(reads.read("f"), reads.read("f"), return_exceptions=True)
    await source.wait_started()
    source.gate.release()
    errors = await failing
    assert [str(e) for e in errors] == ["database down reading f"] * 2
    source.fail, source.value = False, 7
    source.gate.release()
    assert await reads.read("f") == 7


class GatedWriter:
    """Writes groups of arguments, each waiting until the test opens the gate; answers doubles."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.started = asyncio.Semaphore(0)
        self.gate = asyncio.Semaphore(0)
        self.fail = False

    async def write(self, group: list[int]) -> list[int]:
        self.groups.append(list(group))
        self.started.release()
        await asyncio.wait_for(self.gate.acquire(), timeout=10)
        if self.fail:
            raise RuntimeError(f"database down writing {group}")
        return [2 * argument for argument in group]


@pytest.fixture
def writer() -> GatedWriter:
    return GatedWriter()


async def test_calls_made_while_a_group_is_written_are_written_together_next(writer):
    batched = BatchedCall(writer.write)
    first = asyncio.ensure_future(batched.call(1))
    await asyncio.wait_for(writer.started.acquire(), timeout=10)
    later = [asyncio.ensure_future(batched.call(n)) for n in (2, 3, 4)]
    await asyncio.sleep(0.05)
    writer.gate.release()
    assert await first == 2
    await asyncio.wait_for(writer.started.acquire(), timeout=10)
    writer.gate.release()
    assert await asyncio.gather(*later) == [4, 6, 8], "each call gets its own answer"
    assert writer.groups == [[1], [2, 3, 4]], "in the order they were made"


async def test_a_failed_group_fails_each_of_its_calls_and_the_next_call_runs_again(writer):
    batched = BatchedCall(writer.write)
    writer.fail = True
    failing = asyncio.gather(batched.call(1), batched.call(2), return_exceptions=True)
    await asyncio.wait_for(writer.started.acquire(), timeout=10)
    writer.gate.release()
    assert [str(e) for e in await failing] == ["database down writing [1, 2]"] * 2
    writer.fail = False
    writer.gate.release()
    assert await batched.call(5) == 10


async def test_a_call_that_gives_up_leaves_its_group_written_for_the_others(writer):
    batched = BatchedCall(writer.write)
    leaving, staying = asyncio.ensure_future(batched.call(1)), asyncio.ensure_future(batched.call(2))
    await asyncio.wait_for(writer.started.acquire(), timeout=10)
    leaving.cancel()
    writer.gate.release()
    assert await staying == 4 and leaving.cancelled()
    assert writer.groups == [[1, 2]]

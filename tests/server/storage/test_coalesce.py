"""CoalescedRead: concurrent callers share reads, and no caller gets a value read before it called."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dynamiccl.server.storage.coalesce import CoalescedRead


class GatedSource:
    """A value read by `fetch`, which blocks until the test opens its gate."""

    def __init__(self) -> None:
        self.value = 0
        self.fetches = 0
        self.started = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        self.fail = False

    def fetch(self, key: str) -> int:
        value = self.value  # what the database holds when the query starts
        self.fetches += 1
        self.started.release()
        assert self.gate.acquire(timeout=10)
        if self.fail:
            raise RuntimeError(f"database down reading {key}")
        return value


def test_a_caller_that_arrives_during_a_read_gets_a_later_read():
    source = GatedSource()
    reads = CoalescedRead(source.fetch)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(reads.read, "f")
        assert source.started.acquire(timeout=10)  # the first read has started, with value 0
        source.value = 1  # a batch is stored; then these callers ask
        late = [pool.submit(reads.read, "f") for _ in range(3)]
        time.sleep(0.5)  # the three are waiting (a thread of the pool reaches read() in microseconds)
        source.gate.release()  # the first read returns what it read
        assert first.result(timeout=10) == 0
        assert source.started.acquire(timeout=10)  # one more read, for all three
        source.gate.release()
        try:
            assert [f.result(timeout=10) for f in late] == [1, 1, 1]
        finally:
            source.gate.release()  # a straggler's read of its own (caught below) does not hang the test
    assert source.fetches == 2


def test_keys_are_read_independently():
    source = GatedSource()
    reads = CoalescedRead(source.fetch)
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(reads.read, "a")
        b = pool.submit(reads.read, "b")
        assert source.started.acquire(timeout=10) and source.started.acquire(timeout=10)  # both run at once
        source.gate.release()
        source.gate.release()
        assert a.result(timeout=10) == b.result(timeout=10) == 0


def test_a_failed_read_fails_its_callers_and_the_next_read_tries_again():
    source = GatedSource()
    source.fail = True
    reads = CoalescedRead(source.fetch)
    with ThreadPoolExecutor(1) as pool:
        failing = pool.submit(reads.read, "f")
        assert source.started.acquire(timeout=10)
        source.gate.release()
        with pytest.raises(RuntimeError, match="database down reading f"):
            failing.result(timeout=10)
    source.fail = False
    source.value = 7
    source.gate.release()
    assert reads.read("f") == 7

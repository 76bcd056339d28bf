"""Pins (answers every replica must give alike): first writer wins, they expire, they are bounded."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from dynamiccl.server.storage import open_store
from dynamiccl.server.storage.sql import PRUNE_EVERY, SqlStore
from dynamiccl.server.storage.tables import pins


def count(store: SqlStore) -> int:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(pins)).scalar_one()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, sqlite_url):
    return sqlite_url if request.param == "sqlite" else request.getfixturevalue("postgres_schema_url")


def test_the_first_writer_wins_until_replaced(url):
    store = SqlStore(url)
    assert store.pin("k", "first") == "first" and store.pin("k", "second") == "first"
    assert store.pin("k", "third", replace=True) == "third" and store.pinned("k") == "third"


def test_entries_pinned_under_one_key_each_keep_their_first_writer(url):
    store = SqlStore(url)
    assert store.pin_entries("round", {"a": "1", "b": "2"}) == {"a": "1", "b": "2"}
    assert store.pin_entries("round", {"b": "again", "c": "3"}) == {"b": "2", "c": "3"}
    assert store.pin_entries("round", {"a": "x", "b": "y", "c": "z"}) == {"a": "1", "b": "2", "c": "3"}
    assert store.pin_entries("another round", {"a": "4"}) == {"a": "4"}
    assert store.pin_entries("round", {}) == {}
    assert count(store) == 2, "a row per key, however many entries"


def test_concurrent_pinners_of_overlapping_entries_agree_on_one_value_each(url):
    stores = [SqlStore(url) for _ in range(4)]
    entries = [f"context-{i}" for i in range(40)]

    def pin_as(writer: int) -> dict[str, str]:
        mine = entries[writer * 10:writer * 10 + 20]  # half of each writer's entries are the next one's
        return stores[writer].pin_entries("round", {entry: f"writer-{writer}" for entry in mine})

    with ThreadPoolExecutor(len(stores)) as pool:
        answers = list(pool.map(pin_as, range(len(stores))))
    winners: dict[str, str] = {}
    for answer in answers:
        for entry, value in answer.items():
            assert winners.setdefault(entry, value) == value, "every writer reads back the same winner"
    assert set(winners) == set(entries)
    assert stores[0].pin_entries("round", dict.fromkeys(entries, "late")) == winners


def test_concurrent_requests_pin_in_one_transaction_and_the_first_made_wins(url):
    store = SqlStore(url)

    async def ask() -> list[dict[str, str]]:
        return await asyncio.gather(*(store.apin_entries("round", {"shared": f"request-{i}", f"own-{i}": "v"})
                                      for i in range(5)))

    answers = asyncio.run(ask())
    assert [answer["shared"] for answer in answers] == ["request-0"] * 5
    assert all(answer[f"own-{i}"] == "v" for i, answer in enumerate(answers))
    assert count(store) == 1


def test_an_expired_pin_is_gone_and_the_next_writer_pins_afresh(url):
    store = SqlStore(url, pin_ttl_s=0.2)
    store.pin("job", "old")
    store.pin_entries("round", {"a": "old"})
    time.sleep(0.3)
    assert store.pinned("job") is None
    assert store.pin("job", "new") == "new" and store.pinned("job") == "new"
    assert store.pin_entries("round", {"b": "new"}) == {"b": "new"}
    assert store.pin_entries("round", {"a": "new"}) == {"a": "new"}, "the expired entries went with it"


def test_pins_are_bounded_oldest_first(url):
    store = SqlStore(url, max_pins=5)
    for i in range(PRUNE_EVERY * 2):
        store.pin(f"job-{i}", str(i))
    assert count(store) <= 5 + PRUNE_EVERY  # pruned as they come
    store.prune_pins()
    assert count(store) == 5 and store.pinned(f"job-{PRUNE_EVERY * 2 - 1}") is not None
    assert store.pinned("job-0") is None


def test_pinning_trims_to_the_bound_once_a_tenth_over_it(url):
    """Finding the oldest sorts every pin: the prunes that follow pinning leave a tenth of room."""
    store = SqlStore(url, max_pins=640)
    for i in range(704):  # over the bound by its tenth, not more
        store.pin(f"job-{i:03}", "v")
    assert count(store) == 704
    for i in range(704, 768):
        store.pin(f"job-{i:03}", "v")
    assert count(store) == 640  # the oldest went
    assert store.pinned("job-127") is None and store.pinned("job-128") == "v"


def test_the_bounds_come_from_the_environment(sqlite_url, monkeypatch):
    monkeypatch.setenv("DYNAMICCL_PIN_TTL_S", "60")
    monkeypatch.setenv("DYNAMICCL_MAX_PINS", "10")
    store = open_store(sqlite_url)
    assert (store.pin_ttl_s, store.max_pins) == (60.0, 10)
    for bad in ("lots", "inf", "0"):
        monkeypatch.setenv("DYNAMICCL_MAX_PINS", bad)
        with pytest.raises(ValueError, match="DYNAMICCL_MAX_PINS"):
            open_store(sqlite_url)

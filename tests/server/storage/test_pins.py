"""Pins (answers every replica must give alike): first writer wins, they expire, they are bounded."""

from __future__ import annotations

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


def test_many_keys_are_pinned_at_once_each_first_writer_winning_on_its_own(url):
    store = SqlStore(url)
    store.pin("b", "taken")
    assert store.pin_many({"a": "1", "b": "2", "c": "3"}) == {"a": "1", "b": "taken", "c": "3"}
    assert store.pin_many({"c": "again", "d": "4"}) == {"c": "3", "d": "4"}
    assert store.pin_many({"a": "new", "b": "new"}, replace=True) == {"a": "new", "b": "new"}
    assert store.pin_many({}) == {}


def test_concurrent_pinners_of_overlapping_keys_agree_on_one_value_each(url):
    stores = [SqlStore(url) for _ in range(4)]
    keys = [f"suggest|round-{i}" for i in range(40)]

    def pin_as(writer: int) -> dict[str, str]:
        order = keys[writer * 10:] + keys[:writer * 10]  # each writer in its own order
        return stores[writer].pin_many({key: f"writer-{writer}" for key in order})

    with ThreadPoolExecutor(len(stores)) as pool:
        answers = list(pool.map(pin_as, range(len(stores))))
    assert all(answer == answers[0] for answer in answers), "every writer reads back the same winners"
    assert set(answers[0]) == set(keys)


def test_an_expired_pin_is_gone_and_the_next_writer_pins_afresh(url):
    store = SqlStore(url, pin_ttl_s=0.2)
    store.pin("job", "old")
    time.sleep(0.3)
    assert store.pinned("job") is None
    assert store.pin("job", "new") == "new" and store.pinned("job") == "new"


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
    for batch in range(11):  # 704 pins: over the bound by its tenth, not more
        store.pin_many({f"job-{batch}-{k}": "v" for k in range(64)})
    assert count(store) == 704
    store.pin_many({f"job-11-{k}": "v" for k in range(64)})
    assert count(store) == 640  # the two oldest batches went
    assert store.pinned("job-1-63") is None and store.pinned("job-2-0") == "v"


def test_the_bounds_come_from_the_environment(sqlite_url, monkeypatch):
    monkeypatch.setenv("DYNAMICCL_PIN_TTL_S", "60")
    monkeypatch.setenv("DYNAMICCL_MAX_PINS", "10")
    store = open_store(sqlite_url)
    assert (store.pin_ttl_s, store.max_pins) == (60.0, 10)
    for bad in ("lots", "inf", "0"):
        monkeypatch.setenv("DYNAMICCL_MAX_PINS", bad)
        with pytest.raises(ValueError, match="DYNAMICCL_MAX_PINS"):
            open_store(sqlite_url)

"""The SQL store, on SQLite and on PostgreSQL: idempotent atomic batches, pins, migrations."""

import threading

import pytest
from sqlalchemy import inspect

from dynamiccl.schemas import Context, Measurement, NcclConfig
from dynamiccl.server.storage import SqlStore


def measurement(nbytes=1024, latency=10.0, config=NcclConfig(), job="job-1") -> Measurement:
    return Measurement(
        context=Context(collective="allreduce", nbytes=nbytes, nranks=16, nnodes=2),
        config=config, latency_us=latency, count=20, source="sim", job_id=job,
    )


def test_put_fabric_creates_then_replaces(store, h100):
    assert store.put_fabric("dgx", h100) is True
    changed = h100.model_copy(update={"nics_per_node": 4})
    assert store.put_fabric("dgx", changed) is False
    assert store.get_fabric("dgx") == changed
    assert store.get_fabric("missing") is None
    assert list(store.list_fabrics()) == ["dgx"]


def test_a_batch_is_stored_once_whatever_the_retries(store, h100):
    store.put_fabric("dgx", h100)
    batch = [measurement(1024), measurement(2048, config=NcclConfig(algo="ring", proto="ll", nchannels=4))]
    assert store.add_batch("dgx", "agent-1-000001", batch, client="agent-1") is True
    assert store.add_batch("dgx", "agent-1-000001", batch, client="agent-1") is False
    assert store.fabric_counts("dgx") == (2, 2)
    rows = store.measurements("dgx")
    assert [r.context.nbytes for r in rows] == [1024, 2048]
    assert rows[1].config == NcclConfig(algo="ring", proto="ll", nchannels=4)
    assert rows[0].client == "agent-1" and rows[0].job_id == "job-1"


def test_the_same_batch_id_on_another_fabric_is_another_batch(store, h100):
    store.put_fabric("a", h100)
    store.put_fabric("b", h100)
    assert store.add_batch("a", "batch", [measurement()])
    assert store.add_batch("b", "batch", [measurement()])


def test_measurements_page_by_id(store, h100):
    store.put_fabric("dgx", h100)
    for i in range(5):
        store.add_batch("dgx", f"b{i}", [measurement(1024 * (i + 1))])
    first = store.measurements("dgx", limit=2)
    rest = store.measurements("dgx", after_id=first[-1].id)
    assert [r.context.nbytes for r in first + rest] == [1024 * (i + 1) for i in range(5)]


def test_a_failing_batch_leaves_nothing_behind(store, h100):
    """The batch row and its measurements commit together or not at all."""
    with pytest.raises(Exception):
        store.add_batch("no-such-fabric", "b1", [measurement()])  # foreign key violation
    store.put_fabric("dgx", h100)
    assert store.fabric_counts("dgx") == (0, 0)
    assert store.add_batch("dgx", "b1", [measurement()]) is True


def test_the_first_pin_wins_until_replaced(store):
    assert store.pin("k", "first") == "first"
    assert store.pin("k", "second") == "first"
    assert store.pinned("k") == "first"
    assert store.pin("k", "third", replace=True) == "third"
    assert store.pinned("missing") is None


def test_two_stores_on_one_database_agree_on_pins_and_batches(database_url, h100):
    """Replicas share one database: idempotency and pins hold across them."""
    a, b = SqlStore(database_url), SqlStore(database_url)
    try:
        a.put_fabric("dgx", h100)
        results, winners = [], []

        def race(store, value):
            results.append(store.add_batch("dgx", "same-batch", [measurement()]))
            winners.append(store.pin("job|round", value))

        threads = [threading.Thread(target=race, args=(s, v)) for s, v in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]
        assert len(set(winners)) == 1
        assert a.fabric_counts("dgx") == (1, 1)
    finally:
        a.close()
        b.close()


def test_reopening_an_existing_database_keeps_its_data(database_url, h100):
    first = SqlStore(database_url)
    first.put_fabric("dgx", h100)
    first.add_batch("dgx", "b1", [measurement()])
    first.close()
    again = SqlStore(database_url)
    try:
        assert again.fabric_counts("dgx") == (1, 1)
        assert {"fabrics", "batches", "measurements", "pins", "alembic_version"} <= set(
            inspect(again.engine).get_table_names()
        )
    finally:
        again.close()

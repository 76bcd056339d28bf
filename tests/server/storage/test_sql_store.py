"""SqlStore on SQLite and PostgreSQL: fabrics, idempotent and atomic batches, paging, pins
that the first writer wins across processes, and migrations."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from alembic.config import Config

from dynamiccl.schemas import Fabric, Measurement
from dynamiccl.server.storage import SqlStore, open_store
from dynamiccl.server.storage import sql as sql_module
from dynamiccl.server.storage.sql import MIGRATIONS


@pytest.fixture
def fabric(examples) -> Fabric:
    return Fabric.model_validate(examples.FABRIC)


@pytest.fixture
def with_fabric(store: SqlStore, fabric: Fabric) -> SqlStore:
    store.put_fabric("f1", fabric)
    return store


def test_put_fabric_creates_then_replaces(store, fabric):
    assert store.put_fabric("f1", fabric) is True
    replaced = fabric.model_copy(update={"gpus_per_node": 4})
    assert store.put_fabric("f1", replaced) is False
    assert store.get_fabric("f1") == replaced
    assert store.get_fabric("missing") is None
    assert store.list_fabrics() == {"f1": replaced}


def test_a_batch_is_stored_and_read_back_in_id_order(with_fabric, examples):
    items = examples.measurements(3, nbytes=1 << 40)  # beyond 32 bits: nbytes is a BigInteger
    items.append(Measurement.model_validate(examples.measurement(algo=None, proto=None)))
    assert with_fabric.add_batch("f1", "b1", items, client="agent7") is True
    stored = with_fabric.measurements("f1")
    assert [s.id for s in stored] == sorted(s.id for s in stored)
    assert [(s.context, s.config, s.latency_us) for s in stored] == [
        (m.context, m.config, m.latency_us) for m in items
    ]
    first = stored[0]
    assert (first.count, first.source, first.job_id, first.suggestion_id, first.client, first.ts) == (
        20, "inspector", "llama8b-0412", "s-91f2", "agent7", 1764000000.0
    )


def test_measurements_page_by_id(with_fabric, examples):
    with_fabric.add_batch("f1", "b1", examples.measurements(5))
    everything = with_fabric.measurements("f1")
    page = with_fabric.measurements("f1", after_id=everything[1].id, limit=2)
    assert page == everything[2:4]
    assert with_fabric.measurements("f1", after_id=everything[-1].id) == []


def test_a_reader_paging_by_id_misses_no_batch_committed_after_a_later_one(with_fabric, examples, monkeypatch):
    """Ids are handed out as rows are inserted, and transactions commit in any order: a batch
    that took lower ids but committed after a later batch would fall behind a reader that had
    paged past the later batch's ids. Batches of one fabric therefore commit in id order."""
    inserting, release = threading.Event(), threading.Event()
    insert = with_fabric._insert_measurements

    def insert_and_hold_the_first(conn, rows):
        insert(conn, rows)
        if not inserting.is_set():  # the first batch holds its transaction open
            inserting.set()
            assert release.wait(timeout=10)

    monkeypatch.setattr(with_fabric, "_insert_measurements", insert_and_hold_the_first)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(with_fabric.add_batch, "f1", "first", examples.measurements(3))
        assert inserting.wait(timeout=10)
        second = pool.submit(with_fabric.add_batch, "f1", "second", examples.measurements(2))
        time.sleep(0.5)  # time for the second batch to commit, were it not waiting for the first
        read = with_fabric.measurements("f1")  # a learner's refresh, paging meanwhile
        release.set()
        assert first.result(timeout=10) and second.result(timeout=10)
    after = with_fabric.measurements("f1", after_id=max((m.id for m in read), default=0))
    assert len(read) + len(after) == 5


def test_fabric_counts_measurements_and_distinct_contexts(with_fabric, examples):
    assert with_fabric.fabric_counts("f1") == (0, 0)
    with_fabric.add_batch("f1", "b1", examples.measurements(3))
    with_fabric.add_batch("f1", "b2", examples.measurements(2))  # the same two first contexts again
    assert with_fabric.fabric_counts("f1") == (5, 3)


def test_a_batch_id_seen_before_changes_nothing(with_fabric, fabric, examples):
    assert with_fabric.add_batch("f1", "b1", examples.measurements(3)) is True
    assert with_fabric.add_batch("f1", "b1", examples.measurements(7)) is False
    assert with_fabric.fabric_counts("f1") == (3, 3)
    with_fabric.put_fabric("f2", fabric)
    assert with_fabric.add_batch("f2", "b1", examples.measurements(1)) is True  # ids are per fabric


def test_a_batch_whose_insert_fails_leaves_nothing(with_fabric, examples, monkeypatch):
    good_row = sql_module._row

    def row_failing_on_the_third(fabric_id, batch_pk, m, client):
        row = list(good_row(fabric_id, batch_pk, m, client))
        if m.latency_us == 12.0:
            row[sql_module.ROW_COLUMNS.index("latency_us")] = None  # NOT NULL violation halfway through the batch
        return tuple(row)

    monkeypatch.setattr(sql_module, "_row", row_failing_on_the_third)
    with pytest.raises(sa.exc.IntegrityError):
        with_fabric.add_batch("f1", "b1", examples.measurements(5))
    assert with_fabric.fabric_counts("f1") == (0, 0)
    monkeypatch.setattr(sql_module, "_row", good_row)
    assert with_fabric.add_batch("f1", "b1", examples.measurements(5)) is True  # the id is still free


def test_an_empty_batch_still_claims_its_id(with_fabric):
    assert with_fabric.add_batch("f1", "b1", []) is True
    assert with_fabric.add_batch("f1", "b1", []) is False


def test_the_first_pin_wins_until_replaced(store):
    assert store.pinned("k") is None
    assert store.pin("k", "first") == "first"
    assert store.pin("k", "second") == "first"
    assert store.pin("k", "third", replace=True) == "third"
    assert store.pinned("k") == "third"


def test_two_stores_on_one_database_agree_on_pins_and_batches(database_url, with_fabric, examples):
    other = SqlStore(database_url)
    try:
        with ThreadPoolExecutor(8) as pool:
            pins = list(pool.map(lambda i: (with_fabric, other)[i % 2].pin("race", f"v{i}"), range(16)))
            stored = list(pool.map(
                lambda i: (with_fabric, other)[i % 2].add_batch("f1", "same", examples.measurements(50)),
                range(8),
            ))
        assert len(set(pins)) == 1 and other.pinned("race") == pins[0]
        assert stored.count(True) == 1
        assert other.fabric_counts("f1")[0] == 50
    finally:
        other.close()


def test_a_database_created_by_the_first_migration_opens(database_url, fabric):
    engine = sql_module.make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(sa.text(
            "INSERT INTO fabrics (fabric_id, body, created_at, updated_at) VALUES ('old', :body, 0, 0)"
        ), {"body": fabric.model_dump_json()})
    engine.dispose()
    store = open_store(database_url)
    try:
        assert store.get_fabric("old") == fabric
        with store.engine.connect() as conn:
            head = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        assert head == ScriptDirectory.from_config(config).get_current_head()  # the newest schema, on open
    finally:
        store.close()
    SqlStore(database_url).close()  # opening an up-to-date database again is a no-op


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path):
    store = SqlStore(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar() >= 1000
    finally:
        store.close()

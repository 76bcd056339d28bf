"""The spool: durable across reopen and SIGKILL, ids continue after restart, bounded (oldest
dropped, counted)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from dynamiccl.agent.daemon.spool import Spool


def test_batches_survive_reopen_and_ids_continue(tmp_path, make_measurement):
    path = tmp_path / "spool.db"
    spool = Spool(path)
    first = spool.put("fab", [make_measurement(nbytes=1), make_measurement(nbytes=2)])
    second = spool.put("fab", [make_measurement(nbytes=3)])
    agent_id = spool.agent_id
    spool.ack(first)
    spool.close()

    spool = Spool(path)
    assert spool.agent_id == agent_id
    assert spool.depth() == 1
    [batch] = spool.peek_oldest(10)
    assert batch.batch_id == second and batch.fabric_id == "fab"
    assert [m.context.nbytes for m in batch.measurements] == [3]
    third = spool.put("fab", [make_measurement()])
    assert first == f"{agent_id}-{1:012d}" and second.endswith("-000000000002")
    assert third == f"{agent_id}-{3:012d}"  # never reuses an id, even one already acked
    spool.close()


def test_fresh_spool_gets_a_new_agent_id(tmp_path):
    assert Spool(tmp_path / "a.db").agent_id != Spool(tmp_path / "b.db").agent_id


def test_peek_is_oldest_first_and_does_not_remove(tmp_path, make_measurement):
    spool = Spool(tmp_path / "spool.db")
    ids = [spool.put("fab", [make_measurement(nbytes=i)]) for i in range(5)]
    assert [b.batch_id for b in spool.peek_oldest(3)] == ids[:3]
    assert spool.depth() == 5


def test_batch_bound_drops_oldest_and_counts(tmp_path, make_measurement):
    drops: list[int] = []
    spool = Spool(tmp_path / "spool.db", max_batches=3, on_drop=drops.append)
    ids = [spool.put("fab", [make_measurement(nbytes=i)]) for i in range(5)]
    assert spool.depth() == 3
    assert [b.batch_id for b in spool.peek_oldest(10)] == ids[2:]
    assert spool.dropped == 2 and sum(drops) == 2


def test_byte_bound_drops_oldest(tmp_path, make_measurement):
    spool = Spool(tmp_path / "spool.db", max_bytes=10_000)
    ids = [spool.put("fab", [make_measurement(nbytes=i)] * 10) for i in range(20)]
    assert spool.size_bytes() <= 10_000
    kept = [b.batch_id for b in spool.peek_oldest(100)]
    assert kept == ids[-len(kept):] and 0 < len(kept) < 20
    assert spool.dropped == 20 - len(kept)


def test_disk_full_drops_oldest_and_keeps_going(tmp_path, make_measurement):
    spool = Spool(tmp_path / "spool.db")
    big = [make_measurement(nbytes=i) for i in range(200)]
    spool.put("fab", big)
    pages = spool._conn.execute("PRAGMA page_count").fetchone()[0]
    spool._conn.execute(f"PRAGMA max_page_count={pages + 2}")  # the "disk" is now nearly full
    results = [spool.put("fab", big) for _ in range(5)]
    assert spool.dropped >= 1
    assert spool.depth() >= 1 and results[-1] is not None
    # Every put either kept its batch or counted it as dropped; nothing raised.
    assert spool.depth() + spool.dropped == 6


def test_a_broken_spool_drops_and_counts_instead_of_raising(tmp_path, make_measurement):
    spool = Spool(tmp_path / "spool.db")
    spool._conn.execute("DROP TABLE batches")
    assert spool.put("fab", [make_measurement()]) is None
    assert spool.dropped == 1


WRITER = """
import sys
from pathlib import Path
from dynamiccl.agent.daemon.spool import Spool
from dynamiccl.schemas import Measurement

spool = Spool(Path(sys.argv[1]))
batch = [Measurement(context={"collective": "allreduce", "nbytes": 1 << 20, "nranks": 8, "nnodes": 1},
                     config={}, latency_us=10.0 + i, count=3, source="torch") for i in range(BATCH)]
while True:
    print(spool.put("fab", batch), flush=True)  # printed once put has returned: spooled
"""
BATCH = 50


def test_an_agent_killed_while_spooling_keeps_every_batch_it_spooled_whole(tmp_path):
    """The durability policy: a batch is spooled when `put` returns (one transaction, WAL,
    synchronous=FULL); an agent killed with SIGKILL at any point leaves every such batch whole
    and nothing of the one it was writing, and the next run continues the ids."""
    path = tmp_path / "spool.db"
    script = WRITER.replace("BATCH", str(BATCH))
    spooled: list[str] = []
    for kills, delay in enumerate((0.3, 0.5, 0.7), start=1):
        writer = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline or not spooled:
            spooled.append(writer.stdout.readline().strip())
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        spooled += [line.strip() for line in writer.stdout if line.strip()]
        spool = Spool(path)
        try:
            batches = spool.peek_oldest(1_000_000)
        finally:
            spool.close()
        found = {b.batch_id: len(b.measurements) for b in batches}
        assert set(spooled) <= set(found), "every batch spooled before the kill is there"
        assert set(found.values()) == {BATCH}, "each whole: nothing half-written"
        unreported = set(found) - set(spooled)
        assert len(unreported) <= kills, "at most one batch per kill committed as the kill came"
    sequence = [int(batch_id.rsplit("-", 1)[1]) for batch_id in spooled]
    assert sequence == sorted(set(sequence)), "ids continue across kills, never reused"

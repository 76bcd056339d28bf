"""Retention at the store: old measurements deleted in one transaction except those kept, their
counts kept per call and config, so that what the API reports does not change."""

import time

from dynamiccl.schemas import Context, Fabric, Measurement, NcclConfig

FABRIC = Fabric(gpu="H100", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-ndr400", nics_per_node=8)
SMALL = Context(collective="allreduce", nbytes=4096, nranks=16, nnodes=2)
LARGE = Context(collective="allgather", nbytes=1 << 24, nranks=16, nnodes=2)
RING = NcclConfig(algo="ring", proto="simple")


def post(store, batch_id: str, context: Context, config: NcclConfig, n: int) -> None:
    store.add_batch("f", batch_id, [Measurement(context=context, config=config, latency_us=10.0 + i, count=5,
                                                source="torch") for i in range(n)], "agent-1")


def ids(store) -> list[int]:
    return [m.id for m in store.measurements("f")]


def test_old_rows_go_except_those_kept_and_their_counts_stay(store):
    store.put_fabric("f", FABRIC)
    post(store, "b1", SMALL, NcclConfig(), 6)
    post(store, "b2", LARGE, RING, 4)
    before = store.fabric_counts("f")
    stored = ids(store)
    keep = {stored[0], stored[7]}
    assert store.compact("f", through_id=stored[-1], received_before=time.time() + 1, keep=keep) == 8
    assert ids(store) == sorted(keep)
    assert store.fabric_counts("f") == before == (10, 2)
    counts = {(c.context, c.config): c.rows for c in store.compacted("f")}
    assert counts == {(SMALL, NcclConfig()): 5, (LARGE, RING): 3}
    assert not store.add_batch("f", "b1", []), "a batch with rows left still marks a re-send"


def test_a_batch_left_empty_is_forgotten(store):
    store.put_fabric("f", FABRIC)
    post(store, "b1", SMALL, NcclConfig(), 2)
    post(store, "b2", SMALL, NcclConfig(), 2)
    stored = ids(store)
    assert store.compact("f", stored[-1], time.time() + 1, keep=set(stored[2:])) == 2
    assert store.add_batch("f", "b1", []), "b1 has nothing left: its id is free again"
    assert not store.add_batch("f", "b2", [])


def test_recent_rows_and_rows_past_the_last_one_read_are_untouched(store):
    store.put_fabric("f", FABRIC)
    post(store, "b1", SMALL, NcclConfig(), 3)
    cutoff = time.time()
    time.sleep(0.01)
    post(store, "b2", SMALL, NcclConfig(), 3)  # received after the cutoff
    first = ids(store)
    assert store.compact("f", through_id=first[1], received_before=cutoff, keep=set()) == 2
    assert ids(store) == first[2:], "the row past through_id and the recent batch stay"
    assert store.fabric_counts("f") == (6, 1)


def test_compacting_again_counts_nothing_twice(store):
    store.put_fabric("f", FABRIC)
    post(store, "b1", LARGE, RING, 4)
    last = ids(store)[-1]
    assert store.compact("f", last, time.time() + 1, keep=set()) == 4
    assert store.compact("f", last, time.time() + 1, keep=set()) == 0
    post(store, "b2", LARGE, RING, 2)
    assert store.compact("f", ids(store)[-1], time.time() + 1, keep=set()) == 2
    assert [(c.config, c.rows) for c in store.compacted("f")] == [(RING, 6)]
    assert store.fabric_counts("f") == (6, 1)

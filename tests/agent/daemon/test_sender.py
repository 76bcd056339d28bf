"""The sender: oldest first, retries with backoff, exactly once when responses are lost, and a refused
batch narrowed down so that only what the server refuses is dropped."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from dynamiccl.agent.daemon.sender import Sender, backoff_delay, part_id
from dynamiccl.agent.daemon.spool import Spool
from dynamiccl.client import DynamicclClient
from dynamiccl.schemas import Fabric, NcclConfig
from dynamiccl.server.app import create_app
from dynamiccl.server.storage import SqlStore


@pytest.fixture
def spool(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    yield spool
    spool.close()


def _sender(spool, fake_server, **kwargs) -> Sender:
    client = DynamicclClient("http://fake", attempts=1, transport=fake_server.transport)
    return Sender(spool, client, base_backoff=0.01, max_backoff=0.05, idle_poll=0.02, **kwargs)


def _fill(spool, make_measurement, batches: int, per_batch: int = 3) -> list[str]:
    return [
        spool.put("fab", [make_measurement(nbytes=b * 100 + i) for i in range(per_batch)]) for b in range(batches)
    ]


def test_backoff_grows_with_jitter_up_to_the_cap():
    assert 0.25 <= backoff_delay(0, 0.5, 30) <= 0.5
    assert 4.0 <= backoff_delay(4, 0.5, 30) <= 8.0
    assert 15.0 <= backoff_delay(50, 0.5, 30) <= 30.0


def test_sends_oldest_first_and_acks(spool, fake_server, make_measurement):
    fake_server.fabrics["fab"] = {}
    ids = _fill(spool, make_measurement, 5)
    sent: list[str] = []
    sender = _sender(spool, fake_server, on_sent=lambda b: sent.append(b.batch_id))
    sender.drain_once()
    assert sent == ids and spool.depth() == 0
    assert fake_server.measurements == 15 and sender.last_success is not None


def test_lost_responses_deliver_exactly_once(spool, fake_server, make_measurement):
    fake_server.fabrics["fab"] = {}
    _fill(spool, make_measurement, 4)
    fake_server.lose_responses = 3  # the server stores, the answer never arrives
    failures: list[None] = []
    sender = _sender(spool, fake_server, on_failure=lambda: failures.append(None))
    for _ in range(10):
        sender.drain_once()
        if spool.depth() == 0:
            break
    assert spool.depth() == 0
    assert fake_server.measurements == 12 and len(fake_server.batches) == 4
    assert len(failures) == 3 and fake_server.posts == 7


def test_server_down_keeps_batches_then_recovers_in_thread(spool, fake_server, make_measurement):
    fake_server.fabrics["fab"] = {}
    fake_server.down = True
    _fill(spool, make_measurement, 3)
    sender = _sender(spool, fake_server)
    sender.start()
    try:
        time.sleep(0.3)
        assert spool.depth() == 3 and sender.failures >= 2
        fake_server.down = False
        deadline = time.monotonic() + 5
        while spool.depth() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert spool.depth() == 0 and fake_server.measurements == 9 and sender.failures == 0
    finally:
        sender.stop()


def test_a_batch_refused_without_naming_anything_is_dropped_and_counted(spool, fake_server, make_measurement):
    fake_server.fabrics["fab"] = {}
    _fill(spool, make_measurement, 2)
    fake_server.status = 422
    refused: list[int] = []
    sender = _sender(spool, fake_server, on_refused=refused.append)
    sender.drain_once()
    assert spool.depth() == 0 and sum(refused) == 6 and fake_server.measurements == 0


def _is_big(body: dict) -> bool:
    return body["context"]["nbytes"] == 1 << 30


@pytest.mark.parametrize("named", [True, False], ids=["refusal names them", "refusal names nothing"])
def test_only_the_refused_measurements_are_dropped(spool, fake_server, make_measurement, named):
    fake_server.fabrics["fab"] = {}
    fake_server.refuse, fake_server.name_refused = _is_big, named
    good = [make_measurement(nbytes=1000 + i) for i in range(8)]
    spool.put("fab", [*good[:3], make_measurement(nbytes=1 << 30), *good[3:], make_measurement(nbytes=1 << 30)])
    refused: list[int] = []
    sender = _sender(spool, fake_server, on_refused=refused.append)
    sender.drain_once()
    assert spool.depth() == 0 and fake_server.measurements == 8 and sum(refused) == 2


def test_narrowing_interrupted_by_an_outage_stores_nothing_twice(spool, fake_server, make_measurement):
    fake_server.fabrics["fab"] = {}
    fake_server.refuse, fake_server.name_refused = _is_big, False
    spool.put("fab", [make_measurement(nbytes=1 << 30), *(make_measurement(nbytes=1000 + i) for i in range(7))])
    fake_server.lose_responses = 2  # the first parts are stored, their answers lost
    sender = _sender(spool, fake_server)
    for _ in range(10):
        sender.drain_once()
        if spool.depth() == 0:
            break
    assert spool.depth() == 0 and fake_server.measurements == 7


def test_part_ids_are_stable_and_fit_the_id_limit():
    long_id = "x" * 128
    assert part_id(long_id, "a") == part_id(long_id, "a") != part_id(long_id, "b")
    assert len(part_id(long_id, "a")) <= 128 and part_id("b1", "a").startswith("b1~")


def test_the_real_server_stores_every_valid_measurement_of_a_mixed_batch(spool, tmp_path, make_measurement):
    """One measurement of NVLS on a PCIe fabric among ten: the server refuses the batch, the rest lands."""
    store = SqlStore(f"sqlite:///{tmp_path}/server.db")
    pcie = Fabric(gpu="L40S", gpus_per_node=8, intra_node="pcie", inter_node="none", nics_per_node=0)
    with TestClient(create_app(store=store, tokens={})) as server:
        assert server.put("/v1/fabrics/fab", json=pcie.model_dump(mode="json")).status_code in (200, 201)
        batch = [make_measurement(nbytes=1000 + i) for i in range(9)]
        batch.insert(4, make_measurement(config=NcclConfig(algo="nvls", proto="simple")))
        spool.put("fab", batch)
        client = DynamicclClient("http://fake", attempts=1,
                                 transport=httpx.MockTransport(lambda request: server.send(request)))
        refused: list[int] = []
        Sender(spool, client, on_refused=refused.append).drain_once()
        assert server.get("/v1/fabrics/fab").json()["measurements"] == 9
    assert refused == [1] and spool.depth() == 0


@pytest.mark.parametrize("status", [408, 429, 401, 503])
def test_transient_refusals_keep_the_batch(spool, fake_server, make_measurement, status):
    fake_server.fabrics["fab"] = {}
    _fill(spool, make_measurement, 2)
    fake_server.status = status
    sender = _sender(spool, fake_server)
    assert sender.drain_once() > 0
    assert spool.depth() == 2 and sender.failures == 1


def test_unknown_fabric_asks_for_registration_and_keeps_the_batch(spool, fake_server, make_measurement):
    _fill(spool, make_measurement, 1)
    asked: list[None] = []
    sender = _sender(spool, fake_server, on_unknown_fabric=lambda: asked.append(None))
    sender.drain_once()
    assert spool.depth() == 1 and asked
    fake_server.fabrics["fab"] = {}
    sender.drain_once()
    assert spool.depth() == 0

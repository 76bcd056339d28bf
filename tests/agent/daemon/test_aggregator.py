"""The aggregator: count-weighted means per (job, context, config) and window, bounded keys."""

from __future__ import annotations

import pytest

from dynamiccl.agent.daemon.aggregator import Aggregator
from dynamiccl.agent.daemon.spool import Spool
from dynamiccl.agent.daemon.workload import WorkloadRecorder
from dynamiccl.schemas import NcclConfig


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    yield spool
    spool.close()


def test_one_batch_per_window_with_weighted_means(spool, make_measurement):
    clock = Clock()
    agg = Aggregator(spool, "fab", window_s=10, clock=clock)
    agg.add([make_measurement(latency_us=100, count=1), make_measurement(latency_us=200, count=3)])
    agg.add([make_measurement(latency_us=50, count=2, config=NcclConfig(algo="ring"))])
    agg.add([make_measurement(latency_us=10, count=1, job_id="job-2")])
    clock.now = 9.9
    assert agg.tick() is None and spool.depth() == 0
    clock.now = 10.0
    batch_id = agg.tick()
    [batch] = spool.peek_oldest(10)
    assert batch.batch_id == batch_id and batch.fabric_id == "fab"
    rows = {(m.job_id, m.config.label()): m for m in batch.measurements}
    assert len(rows) == 3
    merged = rows[("job-1", "default")]
    assert merged.count == 4 and merged.latency_us == pytest.approx((100 + 600) / 4)
    assert rows[("job-1", "ring/*/*")].count == 2
    assert merged.ts is not None
    clock.now = 25.0
    assert agg.tick() is None  # empty windows spool nothing


def test_too_many_keys_flush_early(spool, make_measurement):
    agg = Aggregator(spool, "fab", window_s=3600, max_keys=4, clock=Clock())
    agg.add([make_measurement(nbytes=i) for i in range(10)])
    assert spool.depth() == 2 and agg.pending() == 2
    assert [len(b.measurements) for b in spool.peek_oldest(10)] == [4, 4]
    agg.flush()
    assert sum(len(b.measurements) for b in spool.peek_oldest(10)) == 10


def test_workload_weights_by_call_rate(make_measurement):
    clock = Clock()
    recorder = WorkloadRecorder(clock=clock)
    recorder.record([make_measurement(nbytes=1, count=100), make_measurement(nbytes=2, count=10)])
    clock.now = 10.0
    recorder.record([make_measurement(nbytes=1, count=100), make_measurement(job_id=None, count=5)])
    contexts = recorder.contexts("job-1")
    assert [c.nbytes for c in contexts] == [1, 2]
    assert contexts[0].weight == pytest.approx(20.0) and contexts[1].weight == pytest.approx(1.0)
    assert recorder.contexts("unknown") == []

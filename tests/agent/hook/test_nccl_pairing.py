"""NCCL-path pairing (fake WorkInfo objects, no GPU) and attribution of calls to NCCL configs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any

from dynamiccl.agent.hook import nccl as hook_nccl
from dynamiccl.agent.hook.nccl import MAX_PENDING, SizeLedger
from dynamiccl.agent.hook.table import CallKey, CallTable, ConfigResolver, to_measurements
from dynamiccl.schemas import Algo, Collective, Context, NcclConfig, Proto


class OpType(Enum):  # stands in for torch's c10d OpType
    ALLREDUCE = 1
    _ALLGATHER_BASE = 2
    SEND = 3
    RECV = 4
    COALESCED = 5
    BARRIER = 6


@dataclass
class WorkInfo:
    op_type: Any
    seq: int
    active_duration: Any


def key(collective: Collective = Collective.allreduce, nbytes: int = 4096) -> CallKey:
    return CallKey(collective, nbytes, 8, 1, True)


def ledger() -> tuple[SizeLedger, list[tuple[CallKey, float]]]:
    got: list[tuple[CallKey, float]] = []
    return SizeLedger(lambda k, s: got.append((k, s))), got


def test_collectives_pair_by_sequence_number_in_any_completion_order() -> None:
    sizes, got = ledger()
    sizes.collective_issued(1, key(nbytes=100))
    sizes.collective_issued(2, key(Collective.allgather, 800))
    sizes.on_completion(WorkInfo(OpType._ALLGATHER_BASE, 2, timedelta(microseconds=30)))
    sizes.on_completion(WorkInfo(OpType.ALLREDUCE, 1, 0.5))  # float milliseconds
    assert got == [(key(Collective.allgather, 800), 30e-6), (key(nbytes=100), 0.5e-3)]
    assert sizes.unpaired == 0 and sizes.errors == 0


def test_ops_without_a_recorded_size_are_counted_not_timed() -> None:
    sizes, got = ledger()
    sizes.on_completion(WorkInfo(OpType.ALLREDUCE, 7, timedelta(microseconds=5)))  # issued before install
    sizes.on_completion(WorkInfo(OpType.BARRIER, 8, timedelta(microseconds=5)))
    sizes.on_completion(WorkInfo(OpType.COALESCED, 9, timedelta(microseconds=5)))
    assert got == [] and sizes.unpaired == 3


def test_coalesced_collectives_pair_by_their_one_sequence_number() -> None:
    sizes, got = ledger()
    sizes.collective_issued(4, key(Collective.reducescatter, 3 << 20))  # e.g. reduce_scatter_tensor_coalesced_
    sizes.p2p_issued(key(Collective.sendrecv, 64))
    sizes.on_completion(WorkInfo(OpType.COALESCED, 4, timedelta(microseconds=30)))
    assert got == [(key(Collective.reducescatter, 3 << 20), 30e-6)], "its own op, not the pending send"


def test_point_to_point_pairs_in_issue_order_and_coalesced_batches_as_one() -> None:
    sizes, got = ledger()
    sizes.p2p_issued(key(Collective.sendrecv, 10))
    sizes.p2p_issued(key(Collective.sendrecv, 20))
    sizes.on_completion(WorkInfo(OpType.SEND, 1, timedelta(microseconds=1)))
    sizes.on_completion(WorkInfo(OpType.RECV, 1, timedelta(microseconds=2)))
    assert [k.nbytes for k, _ in got] == [10, 20]
    sizes.p2p_issued(key(Collective.sendrecv, 64))
    sizes.p2p_issued(key(Collective.sendrecv, 32))
    sizes.on_completion(WorkInfo(OpType.COALESCED, 2, timedelta(microseconds=9)))  # batch_isend_irecv
    assert got[-1] == (key(Collective.sendrecv, 64), 9e-6) and len(got) == 3


def test_the_completion_hook_never_raises() -> None:
    def broken_record(k: CallKey, s: float) -> None:
        raise RuntimeError("table gone")

    sizes = SizeLedger(broken_record)
    sizes.collective_issued(1, key())
    sizes.on_completion(WorkInfo(OpType.ALLREDUCE, 1, timedelta(microseconds=3)))
    sizes.on_completion(object())  # not a WorkInfo at all
    sizes.on_completion(WorkInfo(OpType.ALLREDUCE, "x", None))
    assert sizes.errors == 3


def test_pending_sizes_are_bounded() -> None:
    sizes, _ = ledger()
    for seq in range(MAX_PENDING + 10):
        sizes.collective_issued(seq, key())
    assert sizes.unpaired == 10
    sizes.on_completion(WorkInfo(OpType.ALLREDUCE, 0, timedelta(microseconds=1)))  # forgotten
    assert sizes.unpaired == 11


def test_register_reports_why_a_group_cannot_be_hooked() -> None:
    class Refuses:
        def _register_on_completion_hook(self, fn: Any) -> None:
            raise ValueError("requires TORCH_NCCL_ENABLE_TIMING")

    class Accepts:
        hooks: list = []

        def _register_on_completion_hook(self, fn: Any) -> None:
            self.hooks.append(fn)

    sizes, _ = ledger()
    assert "TORCH_NCCL_ENABLE_TIMING" in hook_nccl.register(object(), Refuses(), sizes)
    accepts = Accepts()
    assert hook_nccl.register(accepts, object(), sizes) is None and accepts.hooks == [sizes.on_completion]
    assert hook_nccl.register(object(), object(), sizes) is not None


def test_config_in_force_comes_from_the_environment() -> None:
    resolver = ConfigResolver.from_env(
        {"NCCL_ALGO": "allreduce:tree;allgather:ring", "NCCL_PROTO": "LL128",
         "NCCL_MIN_NCHANNELS": "8", "NCCL_MAX_NCHANNELS": "8", "NCCL_P2P_NCHANNELS": "4"}
    )
    ctx = Context(collective="allreduce", nbytes=1 << 20, nranks=8, nnodes=1)
    assert resolver.config(ctx) == NcclConfig(algo=Algo.tree, proto=Proto.ll128, nchannels=8)
    bcast = ctx.model_copy(update={"collective": Collective.broadcast})
    assert resolver.config(bcast) == NcclConfig(proto=Proto.ll128, nchannels=8)
    p2p = ctx.model_copy(update={"collective": Collective.sendrecv})
    assert resolver.config(p2p) == NcclConfig(nchannels=4)


def test_tuner_rules_decide_per_size_when_the_plugin_is_loaded(tmp_path: Path) -> None:
    rules = tmp_path / "rules.csv"
    rules.write_text("allreduce,0,65535,tree,ll,2,-1,-1\n")
    resolver = ConfigResolver.from_env(
        {"NCCL_TUNER_PLUGIN": "libnccl-tuner.so", "NCCL_TUNER_CONFIG_FILE": str(rules), "NCCL_ALGO": "ring"}
    )
    small = Context(collective="allreduce", nbytes=4096, nranks=8, nnodes=1)
    large = small.model_copy(update={"nbytes": 1 << 20})
    assert resolver.config(small) == NcclConfig(algo=Algo.tree, proto=Proto.ll, nchannels=2)
    assert resolver.config(large) == NcclConfig(algo=Algo.ring)


def test_nccl_calls_under_an_environment_that_is_not_one_config_are_not_attributed() -> None:
    resolver = ConfigResolver.from_env({"NCCL_ALGO": "ring,tree"})
    assert resolver.error is not None
    table = CallTable()
    table.add(CallKey(Collective.allreduce, 4096, 2, 1, True), 1e-3)  # NCCL: unknown config
    table.add(CallKey(Collective.allreduce, 4096, 2, 1, False), 1e-3)  # gloo: all-null config
    table.add(CallKey(Collective.allreduce, 4096, 2, 1, False), 3e-3)
    measurements, skipped = to_measurements(table.take(), resolver, "job")
    assert skipped == 1 and table.take() == {}
    [m] = measurements
    assert m["config"] == {} and m["count"] == 2 and abs(m["latency_us"] - 2000.0) < 1e-6
    assert m["job_id"] == "job" and m["source"] == "torch"

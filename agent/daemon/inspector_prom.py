"""NCCL Inspector's Prometheus textfiles (`NCCL_INSPECTOR_PROM_DUMP=1`) as measurements.

In that mode Inspector writes, per GPU, `nccl_inspector_metrics_<uuid>.prom`
for node exporter's textfile collector (inspector_prom.cc), recreated every
dump interval (at least 30 s) and deleted when the communicator ends. For the
calls of the interval it writes one pair of samples per bucket of (communicator,
collective, message size range, `algo_proto` that NCCL ran):

    nccl_bus_bandwidth_gbs{...,collective="AllReduce",message_size="4-5MB",algo_proto="Ring_LL128"} 310.2
    nccl_collective_exec_time_microseconds{...same labels...} 27.5

and `nccl_p2p_bus_bandwidth_gbs` / `nccl_p2p_exec_time_microseconds` with a
`p2p_operation` label for point-to-point. What that gives and what it lacks:

* The time is the bucket's mean; no call count is written, so each bucket of
  each interval is one measurement (`count` 1).
* `message_size` is a range of Inspector's per-rank size (`[4, 5) MiB`; per
  rank for allgather, reducescatter and alltoall, as in its JSON: `PER_RANK_SIZES`). The size of
  the calls is recovered from the bandwidth: Inspector's bus bandwidth is
  API.md's `nbytes` / time x the collective's bus factor, so `nbytes` is
  bandwidth x time / factor (exact when the bucket's calls are alike),
  clamped to the range (times n_ranks where sizes are per rank); the range's
  midpoint where no bandwidth is written (alltoall, one rank).
* No rank is written: every GPU of a communicator on this node writes the
  same bucket. Of the samples read together, one per communicator, bucket and
  node is kept (the lowest `gpu`), so a call is counted once per node.
* `algo_proto` is what NCCL ran. A measurement is of the config the job was
  told (`config`); a bucket whose pair differs from a pair the job forced is
  not a measurement of it and is dropped (`other_config`).
* Timing is the kernel's (`kernel_gpu`), as Inspector's Prometheus mode uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from dynamiccl.agent.daemon.inspector_names import COLLECTIVES, PER_RANK_SIZES, nccl_name
from dynamiccl.nccl.cost_model import bus_factor
from dynamiccl.schemas import Context, Measurement, NcclConfig

COLLECTIVE_TIME = "nccl_collective_exec_time_microseconds"
COLLECTIVE_BANDWIDTH = "nccl_bus_bandwidth_gbs"
P2P_TIME = "nccl_p2p_exec_time_microseconds"
P2P_BANDWIDTH = "nccl_p2p_bus_bandwidth_gbs"
_SIZE_RANGE = re.compile(r"^(\d+)-(\d+)(B|KB|MB|GB|TB)$")
_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


class PromBucketError(ValueError):
    """A sample that cannot be a measurement; the message says why."""


#: A bucket NCCL ran with another pair than the job forced: not a measurement of the job's config.
OTHER_CONFIG = "other_config"


@dataclass
class TextfileRead:
    """What one read of textfiles gave: measurements, and how many buckets were left out."""

    measurements: list[Measurement]
    malformed: int = 0
    other_config: int = 0


def size_range(label: str) -> tuple[int, int]:
    """Inspector's `message_size` label as bytes [low, high): `4-5MB` is [4 MiB, 5 MiB)."""
    if label == "0B":
        return 0, 1
    match = _SIZE_RANGE.match(label)
    if match is None:
        raise PromBucketError(f"message_size {label!r} is not a range like '4-5MB'")
    unit = _UNITS[match.group(3)]
    return int(match.group(1)) * unit, int(match.group(2)) * unit


def call_size(collective: str, nranks: int, size_label: str, exec_us: float, busbw_gbs: float | None) -> int:
    """API.md's `nbytes` of a bucket's calls (see the module docstring)."""
    low, high = size_range(size_label)
    if collective in PER_RANK_SIZES:
        low, high = low * nranks, high * nranks
    factor = bus_factor(collective, nranks)  # Inspector's factors; it writes no alltoall bandwidth (0)
    if busbw_gbs and busbw_gbs > 0 and factor > 0:
        estimate = busbw_gbs * 1e9 * exec_us * 1e-6 / factor
        return int(min(max(estimate, low), high - 1))
    return math.isqrt(low * high) if low else high // 2


def _int_label(labels: dict[str, str], name: str) -> int:
    try:
        return int(labels[name])
    except (KeyError, ValueError):
        raise PromBucketError(f"label {name}={labels.get(name)!r} is not an integer") from None


def _pair(algo_proto: str) -> tuple[str, str] | None:
    """('ring', 'll128') from 'Ring_LL128'; None when NCCL wrote 'unknown'."""
    algo, _, proto = algo_proto.partition("_")
    if not proto or "unknown" in (algo.lower(), proto.lower()):
        return None
    return nccl_name(algo), nccl_name(proto)


def _told_pair(config: NcclConfig) -> tuple[str, str] | None:
    if config.algo is None or config.proto is None:
        return None
    return nccl_name(str(config.algo)), nccl_name(str(config.proto))


def parse_textfile(text: str, config: NcclConfig, job_id: str | None, ts: float | None) -> TextfileRead:
    """The measurements in one read of Inspector textfiles (one or several GPUs' concatenated);
    ValueError when `text` is not Prometheus text."""
    times: dict[tuple, tuple[float, dict[str, str]]] = {}
    bandwidths: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            if sample.name in (COLLECTIVE_TIME, P2P_TIME):
                times[key] = (sample.value, sample.labels)
            elif sample.name in (COLLECTIVE_BANDWIDTH, P2P_BANDWIDTH):
                bandwidths[key] = sample.value
    read = TextfileRead([])
    kept: dict[tuple, tuple[str, Measurement]] = {}  # per communicator, bucket and node: lowest gpu
    for key, (exec_us, labels) in times.items():
        try:
            measurement = _measurement(labels, exec_us, bandwidths.get(key), config, job_id, ts)
        except PromBucketError:
            read.malformed += 1
            continue
        if measurement == OTHER_CONFIG:
            read.other_config += 1
        elif measurement is not None:
            bucket = tuple(sorted((k, v) for k, v in labels.items() if k != "gpu"))
            gpu = labels.get("gpu", "")
            if bucket not in kept or _gpu_order(gpu) < _gpu_order(kept[bucket][0]):
                kept[bucket] = (gpu, measurement)
    read.measurements = [measurement for _, measurement in kept.values()]
    return read


def _gpu_order(gpu: str) -> tuple[int, str]:
    digits = "".join(c for c in gpu if c.isdigit())
    return (int(digits) if digits else 1 << 30, gpu)


def _measurement(labels: dict[str, str], exec_us: float, busbw: float | None, config: NcclConfig,
                 job_id: str | None, ts: float | None) -> Measurement | str | None:
    """A bucket's measurement; OTHER_CONFIG; or None for what is not counted (as in inspector.py:
    the receiving side of a transfer, a name that is not a collective, no timing)."""
    if "p2p_operation" in labels:
        if nccl_name(labels["p2p_operation"]) != "send":
            return None  # each transfer is counted on its sending side
        collective = "sendrecv"
    else:
        collective = COLLECTIVES.get(nccl_name(labels.get("collective", "")))
        if collective is None:
            return None
        told, ran = _told_pair(config), _pair(labels.get("algo_proto", ""))
        if told is not None and ran is not None and told != ran:
            return OTHER_CONFIG
    if not math.isfinite(exec_us) or exec_us <= 0:
        return None
    nranks, nnodes = _int_label(labels, "nranks"), _int_label(labels, "n_nodes")
    slurm = labels.get("slurm_job_id", "unknown")
    try:
        return Measurement(
            context=Context(collective=collective, nranks=nranks, nnodes=max(nnodes, 1),
                            nbytes=call_size(collective, nranks, labels.get("message_size", ""), exec_us, busbw)),
            config=config,
            latency_us=float(exec_us),
            count=1,
            source="inspector",
            job_id=job_id or (slurm[:128] if slurm != "unknown" else None),
            ts=ts,
        )
    except ValueError as error:  # pydantic's ValidationError: out-of-range ranks, sizes, times
        raise PromBucketError(str(error)) from None


def is_textfile(name: str) -> bool:
    return name.endswith(".prom")


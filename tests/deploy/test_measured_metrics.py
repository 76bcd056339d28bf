"""The server's per-call metrics behind the collectives dashboard and the tuned-slower alert:
calls, time and bus bytes per (fabric, collective, size class, config kind)."""

from __future__ import annotations

import pytest

from dynamiccl.schemas import Measurement
from dynamiccl.server.metrics import ServerMetrics


def measurement(nbytes: int, latency_us: float, count: int, config: dict, suggestion_id: str | None = None) -> Measurement:
    return Measurement.model_validate({
        "context": {"collective": "allreduce", "nbytes": nbytes, "nranks": 16, "nnodes": 2},
        "config": config, "latency_us": latency_us, "count": count, "source": "sim",
        "suggestion_id": suggestion_id,
    })


def test_calls_time_and_bus_bytes_are_summed_per_size_class_and_config_kind():
    metrics = ServerMetrics()
    ring = {"algo": "ring", "proto": "simple", "nchannels": 16}
    metrics.observe_measured("fab", [
        measurement(1 << 20, 100.0, 10, {}),                        # default, <=1MiB
        measurement(512 << 10, 60.0, 5, {}),                        # default, <=1MiB
        measurement(1 << 20, 80.0, 4, ring, suggestion_id="s-1"),   # suggested
        measurement(1 << 20, 90.0, 2, ring),                        # tuned
        measurement(1 << 30, 5000.0, 1, ring),                      # tuned, >256MiB
    ])

    def value(name: str, size: str, kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            name, {"fabric": "fab", "collective": "allreduce", "size_class": size, "config": kind})

    assert value("dynamiccl_measured_calls_total", "<=1MiB", "default") == 15
    assert value("dynamiccl_measured_call_seconds_total", "<=1MiB", "default") == pytest.approx(
        (100.0 * 10 + 60.0 * 5) * 1e-6)
    bus_factor = 2 * 15 / 16  # allreduce over 16 ranks
    assert value("dynamiccl_measured_bus_bytes_total", "<=1MiB", "default") == pytest.approx(
        ((1 << 20) * 10 + (512 << 10) * 5) * bus_factor)
    assert value("dynamiccl_measured_calls_total", "<=1MiB", "suggested") == 4
    assert value("dynamiccl_measured_calls_total", "<=1MiB", "tuned") == 2
    assert value("dynamiccl_measured_calls_total", ">256MiB", "tuned") == 1
    assert value("dynamiccl_measured_calls_total", ">256MiB", "default") is None
    # bus bytes over seconds is nccl-tests' busbw: 1 GiB in 5 ms at factor 1.875
    busbw = (value("dynamiccl_measured_bus_bytes_total", ">256MiB", "tuned")
             / value("dynamiccl_measured_call_seconds_total", ">256MiB", "tuned"))
    assert busbw == pytest.approx((1 << 30) / 5e-3 * bus_factor)

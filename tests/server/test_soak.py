"""A short soak (the full one is benchmarks/reliability.py): agents post, launchers ask for
recommendations, malformed requests arrive and the server is killed with SIGKILL and restarted
midway. No request errs, every acknowledged measurement is stored once, memory stays bounded."""

from __future__ import annotations

import math

import pytest


@pytest.mark.slow
def test_a_short_soak_with_a_kill_loses_nothing_and_never_errs(reliability, tmp_path):
    lines: list[str] = []
    log, stored, rows = reliability.run_soak(seconds=24, agents=4, launchers=2, kills=1, interval_s=8,
                                             workdir=str(tmp_path), on_interval=lines.append)
    assert log.errors == []
    assert log.faults_injected == log.faults_survived == 1
    assert log.bad_inputs > 0, "hostile requests were sent (and, per errors == [], all refused with a 4xx)"
    assert len(log.acknowledged) >= 50
    assert reliability.data_lost(log, stored) == 0, "acknowledged == stored: nothing lost, nothing twice"
    assert len(rows) >= 3 and all(row["requests"] > 0 for row in rows)
    rss = [row["rss MiB"] for row in rows if not math.isnan(row["rss MiB"])]
    assert rss and max(rss) < 1024
    assert len(lines) == len(rows)

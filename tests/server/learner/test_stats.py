"""Per-cell robust statistics: a cell's statistics follow every new sample (they are computed
once per change, not once per read)."""

import math

from dynamiccl.server.learner.stats import Cell


def mean_log(*latencies: float) -> float:
    return math.fsum(map(math.log, latencies)) / len(latencies)


def test_a_cells_location_follows_new_samples():
    cell = Cell()
    for latency in (100.0, 101.0, 99.0):
        cell.add(1 << 20, latency, "a")
    assert math.isclose(cell.location(), mean_log(100.0, 101.0, 99.0))
    for latency in (50.0, 50.5, 49.5, 50.0):
        cell.add(1 << 20, latency, "a")
    own = cell.location()
    assert math.isclose(own, mean_log(50.0, 50.5, 49.5, 50.0)), "the samples near the median of seven"
    cell.add(1 << 20, 50.0, "b")
    assert cell.located() == {"a": own, "b": math.log(50.0)}


def test_a_straggler_is_left_out_of_a_sources_location():
    cell = Cell()
    for latency in (100.0, 101.0, 250.0, 99.0):
        cell.add(1 << 20, latency, "a")
    assert math.isclose(cell.location(), mean_log(100.0, 101.0, 99.0))


def test_a_view_without_distrusted_sources_has_statistics_of_its_own():
    cell = Cell()
    for source, latency in (("honest", 100.0), ("honest", 100.0), ("liar", 10.0), ("liar", 10.0)):
        cell.add(1 << 20, latency, source)
    assert cell.location() < math.log(100.0)
    view = cell.without(frozenset({"liar"}))
    assert view.location() == math.log(100.0) and set(view.located()) == {"honest"}

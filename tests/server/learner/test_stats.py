"""Per-cell robust statistics: a cell's statistics follow every new sample (they are computed
once per change, not once per read)."""

import math

from dynamiccl.server.learner.stats import Cell


def test_a_cells_location_follows_new_samples():
    cell = Cell()
    for latency in (100.0, 101.0, 99.0):
        cell.add(1 << 20, latency, "a")
    assert math.isclose(cell.location(), math.log(100.0))
    for latency in (50.0, 50.5, 49.5, 50.0):
        cell.add(1 << 20, latency, "a")
    assert math.isclose(cell.location(), math.log(50.5)), "the median of the seven samples"
    cell.add(1 << 20, 50.0, "b")
    assert cell.located() == {"a": math.log(50.5), "b": math.log(50.0)}


def test_a_view_without_distrusted_sources_has_statistics_of_its_own():
    cell = Cell()
    for source, latency in (("honest", 100.0), ("honest", 100.0), ("liar", 10.0), ("liar", 10.0)):
        cell.add(1 << 20, latency, source)
    assert cell.location() < math.log(100.0)
    view = cell.without(frozenset({"liar"}))
    assert view.location() == math.log(100.0) and set(view.located()) == {"honest"}

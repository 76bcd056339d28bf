"""Per-cell robust statistics: a cell's statistics follow every new sample (they are computed
once per change, not once per read); stragglers are learned from a fabric's repeated samples and
weighed against a lone sample."""

import math

import pytest

from dynamiccl.server.learner.stats import STRAGGLER_GAP, Cell, Stragglers


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


def test_samples_that_scatter_are_located_at_the_fastest():
    """Two stragglers of three, slowed unequally: no sample is near the median, and since
    stragglers only ever slow a sample, the fastest stands for the clean time."""
    cell = Cell()
    for latency in (43.0, 65.5, 114.0):
        cell.add(1 << 22, latency, "a")
    assert math.isclose(cell.location(), math.log(43.0))


def test_a_view_without_distrusted_sources_has_statistics_of_its_own():
    cell = Cell()
    for source, latency in (("honest", 100.0), ("honest", 100.0), ("liar", 10.0), ("liar", 10.0)):
        cell.add(1 << 20, latency, source)
    assert cell.location() < math.log(100.0)
    view = cell.without(frozenset({"liar"}))
    assert view.location() == math.log(100.0) and set(view.located()) == {"honest"}


def test_stragglers_are_learned_from_repeated_samples():
    """A tenth of the samples twice as slow: the rate and the slowdown beyond STRAGGLER_GAP are
    what the fabric shows, once it has shown enough of them; before that, the defaults."""
    assert Stragglers.learned([]) == Stragglers()
    cells = []
    for i in range(100):
        cell = Cell()
        for j in range(10):
            cell.add(1 << 20, 200.0 if j == i % 10 else 100.0, "a")
        cells.append(cell)
    learned = Stragglers.learned(cells)
    assert learned.rate == pytest.approx(0.1, abs=0.01)
    assert learned.excess == pytest.approx(math.log(2.0) - STRAGGLER_GAP, abs=0.03)


def combined(prior_mean: float, prior_std: float, sample: float, sample_std: float) -> float:
    return (prior_mean / prior_std**2 + sample / sample_std**2) / (prior_std**-2 + sample_std**-2)


def test_a_lone_sample_far_slower_than_predicted_is_taken_for_a_stragglers():
    """Predicted 100 us, measured once at 260: more likely one straggler than a model that far
    off, so the estimate stays near the prediction, wide enough that the config gets a second look."""
    mean, std = Stragglers().lone_sample(math.log(100.0), 0.15, math.log(260.0), 0.15)
    assert mean < math.log(115.0) < combined(math.log(100.0), 0.15, math.log(260.0), 0.15)
    assert std >= 0.1


def test_a_lone_sample_near_or_below_its_prediction_is_taken_as_it_is():
    """Stragglers only slow: a sample as fast as predicted, or faster, is its plain combination
    with the prediction."""
    stragglers = Stragglers()
    for measured in (100.0, 90.0, 60.0):
        mean, std = stragglers.lone_sample(math.log(100.0), 0.15, math.log(measured), 0.15)
        plain = combined(math.log(100.0), 0.15, math.log(measured), 0.15)
        assert mean == pytest.approx(plain, abs=0.01) and std == pytest.approx(0.15 / math.sqrt(2), rel=0.1)


def test_the_rarer_stragglers_are_the_more_a_slow_lone_sample_counts():
    often, seldom = Stragglers(rate=0.2), Stragglers(rate=0.005)
    prediction, sample = math.log(100.0), math.log(170.0)
    assert often.lone_sample(prediction, 0.15, sample, 0.15)[0] < seldom.lone_sample(prediction, 0.15, sample, 0.15)[0]


def test_a_lone_sample_of_any_size_has_a_finite_estimate():
    """A careless or hostile client may post a timing a million times off, either way."""
    for measured in (1e-6, 1e12):
        mean, std = Stragglers().lone_sample(math.log(100.0), 0.15, math.log(measured), 0.15)
        assert math.isfinite(mean) and math.isfinite(std) and std > 0

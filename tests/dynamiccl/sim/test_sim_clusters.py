"""Random clusters: reproducible, unlike the presets, and unlike NCCL's cost model in ways that matter."""

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.schemas import Context, NcclConfig
from dynamiccl.sim import SimulatedFabric, random_cluster, random_clusters

SIZES = [1024 * 4**i for i in range(11)]


def contexts(preset):
    return [
        Context(collective=c, nbytes=s, nranks=n * preset.fabric.gpus_per_node, nnodes=n)
        for n in preset.node_counts for c in ("allreduce", "allgather", "reducescatter") for s in SIZES
    ]


def test_the_same_seed_is_the_same_cluster():
    assert random_cluster(7) == random_cluster(7)
    assert random_cluster(7) != random_cluster(8)
    assert [p.name for p in random_clusters(3, first_seed=5)] == ["random-5", "random-6", "random-7"]


def test_on_some_clusters_nccl_does_not_pick_what_the_cost_model_predicts():
    differing = 0
    for preset in random_clusters(20):
        sim, model = SimulatedFabric(preset), NcclCostModel(preset.fabric)
        differing += any(sim.nccl.default(c) != model.default(c) for c in contexts(preset))
    assert 3 <= differing <= 17


def test_departures_reach_twice_what_the_model_says_and_oracles_never_lose():
    largest = 1.0
    for preset in random_clusters(20):
        sim, model = SimulatedFabric(preset), NcclCostModel(preset.fabric)
        for context in contexts(preset)[::3]:
            _, best = sim.oracle(context)
            assert best <= sim.true_latency_us(context, NcclConfig())
            for config in (NcclConfig(algo="ring", proto="simple"), NcclConfig(algo="ring", proto="ll")):
                ratio = sim.true_latency_us(context, config) / model.time_us(context, config.algo, config.proto, None)
                largest = max(largest, ratio, 1 / ratio)
    assert largest > 2.0

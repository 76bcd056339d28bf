"""Seeded random clusters: fabrics the learner was never tuned on, for benchmarks that cannot be
overfitted.

Each draws its hardware, its size, the size of every departure from NCCL's cost model
(`Effects`, up to 2-3x each, one or two (algorithm, protocol) pairs far off the model), and
on about half of them an NCCL whose own choices differ from what the cost model predicts
(another version's constants: `InstalledNccl`).
"""

from __future__ import annotations

import numpy as np

from dynamiccl.nccl.space import valid_protocols
from dynamiccl.schemas import Algo, Fabric, Proto
from dynamiccl.sim.presets import Preset
from dynamiccl.sim.truth import Effects

_HARDWARE = (
    ("8x H100 SXM, NVSwitch, 8x 400G InfiniBand",
     Fabric(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-ndr400", nics_per_node=8,
            nccl_version="2.28.9")),
    ("8x H200, NVSwitch, 8x 400G RoCE",
     Fabric(gpu="H200", gpus_per_node=8, intra_node="nvswitch", inter_node="roce-400", nics_per_node=8,
            nccl_version="2.27.3")),
    ("8x A100 SXM4, NVSwitch, 4x 200G InfiniBand",
     Fabric(gpu="A100-SXM4-80GB", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-hdr200",
            nics_per_node=4, nccl_version="2.21.5")),
    ("4x L40S, PCIe, one 100G Ethernet NIC",
     Fabric(gpu="L40S", gpus_per_node=4, intra_node="pcie", inter_node="ethernet-100", nics_per_node=1,
            nccl_version="2.23.4")),
    ("4x H100 NVL, NVLink pairs, 2x 200G RoCE",
     Fabric(gpu="H100-NVL", gpus_per_node=4, intra_node="nvlink", inter_node="roce-200", nics_per_node=2,
            nccl_version="2.26.2")),
)
_NODE_COUNTS = ((1,), (2,), (1, 2), (2, 4), (4, 8), (8,))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _pairs(fabric: Fabric) -> list[tuple[Algo, Proto]]:
    algos = (Algo.ring, Algo.tree, Algo.nvls, Algo.nvls_tree, Algo.pat)
    return [(a, p) for a in algos for p in valid_protocols(fabric, a)]


def random_cluster(seed: int) -> Preset:
    """One cluster, the same for the same seed."""
    rng = np.random.default_rng([0xC1A5, seed])
    description, fabric = _HARDWARE[rng.integers(len(_HARDWARE))]
    node_counts = _NODE_COUNTS[rng.integers(len(_NODE_COUNTS))]
    pairs = _pairs(fabric)
    biased = rng.choice(len(pairs), size=int(rng.integers(1, 3)), replace=False)
    effects = Effects(
        saturation_k=_log_uniform(rng, 0.5, 4.0),
        contention_per_channel=float(rng.uniform(0.0, 0.015)),
        interference_per_channel=float(rng.uniform(0.0, 0.006)),
        nvls_extra_latency_us=float(rng.uniform(0.0, 20.0)),
        nvls_bandwidth_efficiency=float(rng.uniform(0.5, 1.1)),
        tree_mid_size_penalty=_log_uniform(rng, 0.4, 1.3),
        net_efficiency=(float(rng.uniform(0.7, 1.0)), float(rng.uniform(0.0, 0.08))),
        nic_depth=(float(rng.uniform(0.0, 0.5)), float(rng.uniform(0.7, 3.0))),
        ll_efficiency=_log_uniform(rng, 0.6, 1.3),
        ll128_efficiency=(_log_uniform(rng, 0.6, 1.5), _log_uniform(rng, 0.5, 1.2)),
        pair_sigma=float(rng.uniform(0.03, 0.2)),
        octave_sigma=float(rng.uniform(0.02, 0.08)),
        latency_sigma=float(rng.uniform(0.05, 0.3)),
        pair_bias=tuple((*pairs[i], _log_uniform(rng, 1 / 3, 3.0)) for i in biased),
    )
    choice_bias: tuple[tuple[Algo, Proto, float], ...] = ()
    if rng.random() < 0.5:
        chosen = rng.choice(len(pairs), size=int(rng.integers(1, 4)), replace=False)
        choice_bias = tuple((*pairs[i], _log_uniform(rng, 0.4, 2.5)) for i in chosen)
    nodes = max(node_counts)
    return Preset(
        name=f"random-{seed}",
        description=f"{nodes} node(s) of {description}; seeded departures from NCCL's model"
                    + ("; NCCL picks by other constants" if choice_bias else ""),
        fabric=fabric,
        nodes=nodes,
        node_counts=node_counts,
        seed=10_000 + seed,
        effects=effects,
        nccl_choice_bias=choice_bias,
    )


def random_clusters(count: int, first_seed: int = 0) -> list[Preset]:
    return [random_cluster(seed) for seed in range(first_seed, first_seed + count)]

"""The simulated fabric's true performance: NCCL's cost model with the departures real clusters show.

Starting point: the latency and bandwidth terms of `dynamiccl.nccl.cost_model` (NCCL's own
model). Each effect multiplies one term; all are smooth in size and channel count, none is larger
than about 1.4x on its own.

| effect | size | source or reason |
| --- | --- | --- |
| channel saturation | n channels work like n_eff = n (1 + k) / (1 + k n / full), k = 1.5, in NCCL's formula: one CTA moves ~2.3x what NCCL's per-channel share says, half the channels keep ~71% | links and NICs saturate with a few CTAs each (nccl-tests sweeps of NCCL_MAX_NCHANNELS; AutoCCL, NSDI'25) |
| NIC queue depth | across nodes a NIC reaches line rate with ~4 channels on it, not NCCL's 2: bandwidth x(1 - 0.3 exp(-(c - 1) / 1.5)) for c channels per NIC, relative to the default | uccl-project/uccl issue 205 (32 channels needed on 8-NIC H100 nodes, 8 "significantly reduced" busbw); NCCL issue 652 ("use enough channels") |
| channel contention | -0.6% bandwidth per channel above the fabric's link count (4 per NIC across nodes, 16 on NVSwitch, 4 on PCIe) | more CTAs than links queue on the same NIC / PCIe switch (NCCL issue 652: "performance should add up" per NIC, not per channel) |
| compute interference | +0.2% time per channel above 8, on calls of 1 MiB and more | CTAs taken by NCCL slow the overlapping compute and the collective back (AutoCCL; NCCL.md: "the model ignores compute running alongside") |
| protocol efficiency | LL -5% bandwidth; LL128 +8% on Hopper, -12% across Ampere nodes | NCCL's caps are per-generation averages; LL128's gain depends on NVLink generation and NIC path |
| tree at mid sizes across nodes | tree bandwidth -25% from 64 KiB to 16 MiB, multi-node | "trees are not perfectly sticking to the model for medium sizes" (tuning.cc); tree slower than ring across nodes (NCCL issue 1368) |
| NVLS overheads | +8 us latency; NVLS bandwidth x0.9 (single node) | multicast setup and memory ordering not in the model; measured NVLS busbw ~470-480 GB/s on 8x H100 vs NCCL's ~590 upper bound |
| network efficiency at scale | inter-node bandwidth x(0.97 - 0.045 log2(nodes)) | congestion, adaptive routing and rail imbalance (AWS p5: 477.7 GB/s at 2 nodes, 274.5 at 8 for 1 GB) |
| seeded per-fabric variation | +-6% bandwidth per (algo, proto), +-4% per size octave, +-10% latency per algo | two clusters of the same parts are never alike: firmware, cabling, switch topology |

Point-to-point calls take NCCL-like p2p time with the same channel effects.
The simulator only produces measurements; nothing outside `dynamiccl.sim` reads this model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.nccl.space import GpuGeneration
from dynamiccl.schemas import Algo, Context, NcclConfig, Proto

@dataclass(frozen=True)
class Effects:
    """The sizes of the departures from NCCL's model; the defaults are the table above, the
    presets' values. `dynamiccl.sim.clusters` draws other clusters from wider ranges."""

    saturation_k: float = 1.5
    contention_per_channel: float = 0.006
    interference_per_channel: float = 0.002
    nvls_extra_latency_us: float = 8.0
    nvls_bandwidth_efficiency: float = 0.9
    tree_mid_size_penalty: float = 0.75
    net_efficiency: tuple[float, float] = (0.97, 0.045)  # at 2 nodes, loss per doubling
    nic_depth: tuple[float, float] = (0.3, 1.5)  # shortfall with one channel per NIC, channels to recover 1/e
    ll_efficiency: float = 0.95
    ll128_efficiency: tuple[float, float] = (1.08, 0.88)  # Hopper and newer, older across nodes
    pair_sigma: float = 0.06
    octave_sigma: float = 0.04
    latency_sigma: float = 0.10
    #: Extra bandwidth factor per (algo, proto) (a cluster where one pair is far off NCCL's model).
    pair_bias: tuple[tuple[Algo, Proto, float], ...] = ()


class TrueModel:
    """Noiseless latency of a fully resolved config on one simulated fabric."""

    def __init__(self, nccl: NcclCostModel, seed: int, effects: Effects = Effects()) -> None:
        self.nccl = nccl
        self.effects = effects
        rng = np.random.default_rng(seed)
        self._pair_variation = {
            (algo, proto): float(np.exp(rng.normal(0.0, effects.pair_sigma))) for algo in Algo for proto in Proto
        }
        for algo, proto, factor in effects.pair_bias:
            self._pair_variation[(algo, proto)] *= factor
        self._octave_variation = np.exp(rng.normal(0.0, effects.octave_sigma, size=64))
        self._latency_variation = {algo: float(np.exp(rng.normal(0.0, effects.latency_sigma))) for algo in Algo}
        self._p2p_variation = float(np.exp(rng.normal(0.0, effects.pair_sigma)))
        fabric = nccl.fabric
        self._nics = max(1, min(fabric.nics_per_node, fabric.gpus_per_node))
        self._links = {
            1: 16 if fabric.intra_node == "nvswitch" else 8 if fabric.intra_node == "nvlink" else 4,
            2: 4 * self._nics,
        }

    def latency_us(self, context: Context, config: NcclConfig) -> float:
        """True time (us) of one call run with a resolved `config` (algo, proto and channels set)."""
        if context.nranks == 1:
            return 1.0
        nch = config.nchannels
        if context.collective.is_p2p:
            effective, contention = self._channels(context, nch, None)
            latency = self.nccl.time_us(context.model_copy(update={"nbytes": 0}), None, None, effective)
            transfer = (self.nccl.time_us(context, None, None, effective) - latency) / contention
            return (latency + transfer) * self._p2p_variation * self._interference(context, nch)
        algo, proto = config.algo, config.proto
        effective, contention = self._channels(context, nch, algo)
        latency, bandwidth = self.nccl.terms(context, algo, proto, effective)
        if bandwidth <= 0:
            return math.inf
        bandwidth *= contention
        bandwidth *= self._protocol_efficiency(context, proto)
        bandwidth *= self._pair_variation[(algo, proto)] * self._octave(context.nbytes)
        if context.nnodes > 1:
            efficiency, loss = self.effects.net_efficiency
            bandwidth *= max(efficiency - loss * math.log2(context.nnodes / 2), 0.05)
        if algo is Algo.tree and context.nnodes > 1 and (1 << 16) <= context.nbytes <= (1 << 24):
            bandwidth *= self.effects.tree_mid_size_penalty
        latency *= self._latency_variation[algo]
        if algo in (Algo.nvls, Algo.nvls_tree):
            latency += self.effects.nvls_extra_latency_us
            if context.nnodes == 1:
                bandwidth *= self.effects.nvls_bandwidth_efficiency
        return (latency + context.nbytes / (1000.0 * bandwidth)) * self._interference(context, nch)

    def _channels(self, context: Context, nchannels: int, algo: Algo | None) -> tuple[float, float]:
        """(effective channel count for NCCL's formula, contention factor on bandwidth).

        Both are 1:1 with NCCL at its full channel count, so the default runs as NCCL models it
        apart from the other effects."""
        full = self.nccl.default_channels(algo, context.nnodes)
        k = self.effects.saturation_k
        effective = nchannels * (1 + k) / (1 + k * nchannels / full)
        links = self._links[min(context.nnodes, 2)]
        excess = max(nchannels - links, 0) - max(full - links, 0)
        contention = max(1.0 - self.effects.contention_per_channel * excess, 0.2)
        if context.nnodes > 1:
            contention *= self._nic_depth(nchannels) / self._nic_depth(full)
        return effective, contention

    def _nic_depth(self, nchannels: int) -> float:
        shortfall, scale = self.effects.nic_depth
        per_nic = max(nchannels / self._nics, 1.0)  # fewer channels than NICs: one NIC each
        return 1.0 - shortfall * math.exp(-(per_nic - 1) / scale)

    def _interference(self, context: Context, nchannels: int) -> float:
        large = min(1.0, max(0.0, (math.log2(context.nbytes + 1) - 16) / 4))
        return 1.0 + self.effects.interference_per_channel * max(nchannels - 8, 0) * large

    def _protocol_efficiency(self, context: Context, proto: Proto) -> float:
        generation = self.nccl.topology.generation
        if proto is Proto.ll:
            return self.effects.ll_efficiency
        hopper, older_across_nodes = self.effects.ll128_efficiency
        if proto is Proto.ll128 and generation >= GpuGeneration.hopper:
            return hopper
        if proto is Proto.ll128 and context.nnodes > 1:
            return older_across_nodes
        return 1.0

    def _octave(self, nbytes: int) -> float:
        """Smooth per-fabric variation over sizes (interpolated between octaves)."""
        position = math.log2(nbytes + 1)
        low = int(position)
        weight = position - low
        table = self._octave_variation
        return float(table[low % 64] * (1 - weight) + table[(low + 1) % 64] * weight)

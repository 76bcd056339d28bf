"""The simulated fabric's true performance: NCCL's cost model with the departures real clusters show.

Starting point: the latency and bandwidth terms of `dynamiccl.nccl.cost_model`.
Each effect below multiplies one term; all are smooth in size and channel count.

| effect | size | source or reason |
| --- | --- | --- |
| channel saturation | bandwidth grows as 1 - exp(-n / (full/3)) instead of linearly: half the channels keep ~80% of the bandwidth | links and NICs saturate with a few CTAs each (nccl-tests sweeps of NCCL_MAX_NCHANNELS; AutoCCL, NSDI'25) |
| compute interference | +0.25% time per channel above 8 on large calls | CTAs taken by NCCL slow the compute overlapping it, and the collective back (AutoCCL; NCCL.md "the model ignores compute running alongside") |
| protocol efficiency by hardware | Hopper LL128 +8% bandwidth; Ampere LL128 across nodes -12%; LL -5% everywhere | NCCL's caps are per generation averages; LL128's gain depends on NVLink generation and NIC path |
| tree at mid sizes across nodes | tree bandwidth -25% from 64 KiB to 16 MiB when nnodes > 1 | trees are "not perfectly sticking to the model for medium sizes" (NCCL tuning.cc comment); reports of tree slower than ring across nodes (NVIDIA/nccl issue 1368) |
| NVLS small-message overhead | +10 us latency for NVLS and NVLS tree | multicast object setup and memory-ordering cost not in the model |
| PAT | +15% bandwidth | PAT is newer than its model entry |
| seeded per-fabric variation | +-6% bandwidth per (algo, proto), +-4% per size octave, +-10% latency per algo | two clusters of the same parts are never alike: firmware, cabling, switch topology |

The simulator only produces measurements; nothing outside `dynamiccl.sim` reads this model.
"""

from __future__ import annotations

import math

import numpy as np

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.nccl.space import GpuGeneration
from dynamiccl.schemas import Algo, Context, NcclConfig, Proto

SATURATION_FRACTION = 1.0 / 3.0
INTERFERENCE_PER_CHANNEL = 0.0025
NVLS_EXTRA_LATENCY_US = 10.0
TREE_MID_SIZE_PENALTY = 0.75
PAT_GAIN = 1.15


class TrueModel:
    """Noiseless latency of a fully resolved config on one simulated fabric."""

    def __init__(self, nccl: NcclCostModel, seed: int) -> None:
        self.nccl = nccl
        rng = np.random.default_rng(seed)
        self._pair_variation = {
            (algo, proto): float(np.exp(rng.normal(0.0, 0.06))) for algo in Algo for proto in Proto
        }
        self._octave_variation = np.exp(rng.normal(0.0, 0.04, size=64))
        self._latency_variation = {algo: float(np.exp(rng.normal(0.0, 0.10))) for algo in Algo}
        self._p2p_variation = float(np.exp(rng.normal(0.0, 0.06)))

    def latency_us(self, context: Context, config: NcclConfig) -> float:
        if context.nranks == 1:
            return 1.0
        if context.collective.is_p2p:
            return self._p2p_latency_us(context, config.nchannels)
        algo, proto, nch = config.algo, config.proto, config.nchannels
        latency, bandwidth = self.nccl.terms(context, algo, proto, nch)
        if bandwidth <= 0:
            return math.inf
        full = self.nccl.default_channels(algo)
        bandwidth *= self._saturation(nch, full) / (min(nch, full) / full)
        bandwidth *= self._protocol_efficiency(context, proto)
        bandwidth *= self._pair_variation[(algo, proto)] * self._octave(context.nbytes)
        if algo is Algo.tree and context.nnodes > 1 and (1 << 16) <= context.nbytes <= (1 << 24):
            bandwidth *= TREE_MID_SIZE_PENALTY
        if algo is Algo.pat:
            bandwidth *= PAT_GAIN
        latency *= self._latency_variation[algo]
        if algo in (Algo.nvls, Algo.nvls_tree):
            latency += NVLS_EXTRA_LATENCY_US
        transfer = context.nbytes / (1000.0 * bandwidth)
        interference = 1.0 + INTERFERENCE_PER_CHANNEL * max(nch - 8, 0) * self._large(context.nbytes)
        return (latency + transfer) * interference

    def _p2p_latency_us(self, context: Context, nchannels: int | None) -> float:
        full = self.nccl.topology.channels
        nch = nchannels or full
        base = self.nccl.time_us(context, None, None, full)
        saturation = self._saturation(nch, full)
        return base * self._p2p_variation / saturation * (1 + INTERFERENCE_PER_CHANNEL * max(nch - 8, 0))

    @staticmethod
    def _saturation(nchannels: int, full: int) -> float:
        """Share of the full-channel bandwidth `nchannels` reach (saturating, not linear)."""
        scale = full * SATURATION_FRACTION
        return (1 - math.exp(-nchannels / scale)) / (1 - math.exp(-full / scale))

    def _protocol_efficiency(self, context: Context, proto: Proto) -> float:
        generation = self.nccl.topology.generation
        if proto is Proto.ll:
            return 0.95
        if proto is Proto.ll128 and generation >= GpuGeneration.hopper:
            return 1.08
        if proto is Proto.ll128 and context.nnodes > 1:
            return 0.88
        return 1.0

    def _octave(self, nbytes: int) -> float:
        """Smooth per-fabric variation over sizes (interpolated between octaves)."""
        position = math.log2(nbytes + 1)
        low = int(position)
        weight = position - low
        table = self._octave_variation
        return float(table[low % 64] * (1 - weight) + table[(low + 1) % 64] * weight)

    @staticmethod
    def _large(nbytes: int) -> float:
        """0 for small calls (latency-bound, short), rising to 1 from 16 MiB up."""
        return min(1.0, max(0.0, (math.log2(nbytes + 1) - 16) / 8))


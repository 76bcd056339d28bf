"""NCCL's own cost model and selection, as in NVIDIA/nccl src/graph/tuning.cc and enqueue.cc.

time = latency(algo, proto) + nBytes / bandwidth(algo, proto)

* latency: a base latency per (algo, proto) plus per-step hardware latencies
  (NVLink, PCI, network); ring counts its steps, tree 2(ppn-1) intra steps and
  2 log2(nodes) network steps.
* bandwidth: the topology's per-channel bandwidth times the channel count,
  capped per protocol (LL at half speed and an absolute cap, LL128 at 0.92 and
  a per-channel cap, tree with a per-channel cap and a correction for medium
  sizes, NVLS scaled by an efficiency), converted from bus to algorithm
  bandwidth.
* selection: the cheapest enabled (algo, proto) at the communicator's channel
  count; then, for small messages, NCCL lowers the channel count until each
  thread has enough work.

The topology NCCL would detect is derived from the wire `Fabric` (link kind,
GPU generation, NICs and their speed). This is NCCL's model, used as the
learner's prior and by the simulator to know what NCCL runs by default; it
knows nothing of how any real or simulated fabric departs from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dynamiccl.nccl.env import parse_env
from dynamiccl.nccl.space import (
    GpuGeneration,
    gpu_generation,
    valid_algorithms,
    valid_protocols,
)
from dynamiccl.nccl.tuner_rules import first_match, parse_rules
from dynamiccl.schemas import Algo, Collective, Context, Fabric, NcclConfig, Proto

_LL, _LL128, _SIMPLE = Proto.ll, Proto.ll128, Proto.simple

# Base latencies (us) per algorithm and protocol (LL, LL128, Simple).
BASE_LATENCY: dict[Algo, tuple[float, float, float]] = {
    Algo.tree: (6.8, 14.0, 8.4),
    Algo.ring: (6.6, 14.0, 8.4),
    Algo.collnet_direct: (0.0, 0.0, 0.0),
    Algo.collnet_chain: (0.0, 0.0, 0.0),
    Algo.nvls: (0.0, 0.0, 0.0),
    Algo.nvls_tree: (0.0, 0.0, 0.0),
    Algo.pat: (0.0, 0.0, 8.4),
}
# Per-step hardware latencies (us) by link kind.
HW_LATENCY: dict[str, dict[Algo, tuple[float, float, float]]] = {
    "nvlink": {
        Algo.tree: (0.6, 1.25, 4.0), Algo.ring: (0.6, 1.9, 3.4),
        Algo.collnet_direct: (0, 0, 3.7), Algo.collnet_chain: (0, 0, 2.8),
        Algo.nvls: (0, 0, 25.0), Algo.nvls_tree: (0, 0, 25.0), Algo.pat: (0, 0, 0),
    },
    "pci": {
        Algo.tree: (1.0, 1.9, 4.0), Algo.ring: (1.0, 2.5, 5.7),
        Algo.collnet_direct: (0, 0, 3.7), Algo.collnet_chain: (0, 0, 2.8),
        Algo.nvls: (0, 0, 0), Algo.nvls_tree: (0, 0, 0), Algo.pat: (0, 0, 0),
    },
    "net": {
        Algo.tree: (5.0, 8.5, 14.0), Algo.ring: (2.7, 4.0, 14.0),
        Algo.collnet_direct: (0, 0, 31.0), Algo.collnet_chain: (0, 0, 30.0),
        Algo.nvls: (0, 0, 18.0), Algo.nvls_tree: (0, 0, 14.0), Algo.pat: (0, 0, 14.0),
    },
}
# Caps indexed by generation, then by (1 node, 2 nodes, more).
LL_MAX_BW = {
    GpuGeneration.volta: (39.0, 39.0, 20.4),
    GpuGeneration.ampere: (87.7, 22.5, 19.0),
    GpuGeneration.hopper: (141.0, 45.0, 35.0),
    GpuGeneration.blackwell: (282.0, 90.0, 70.0),
}
PER_CH_MAX_RING_LL128_BW = {
    GpuGeneration.volta: 20.0, GpuGeneration.ampere: 20.0,
    GpuGeneration.hopper: 36.7, GpuGeneration.blackwell: 73.4,
}
PER_CH_MAX_TREE_BW = {
    GpuGeneration.volta: (26.5, 18.5, 10.0),
    GpuGeneration.ampere: (24.0, 23.6, 17.8),
    GpuGeneration.hopper: (38.7, 41.4, 36.0),
    GpuGeneration.blackwell: (70.0, 42.8, 24.0),
}
PER_CH_MAX_TREE_LL128_BW = {
    GpuGeneration.volta: (20.0, 20.0, 20.0),
    GpuGeneration.ampere: (20.0, 20.0, 20.0),
    GpuGeneration.hopper: (36.7, 36.7, 29.0),
    GpuGeneration.blackwell: (55.6, 31.7, 20.0),
}
NVLS_EFFICIENCY = {GpuGeneration.hopper: 0.85, GpuGeneration.blackwell: 0.74}
# Tree bandwidth correction for medium sizes, per protocol, indexed by log2(nBytes / 64).
TREE_CORRECTION: dict[Proto, tuple[float, ...]] = {
    _LL: (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0),
    _LL128: (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0),
    _SIMPLE: (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9),
}
# Threads per block and bytes of work per thread before NCCL adds a channel.
MAX_THREADS = {_LL: 512, _LL128: 640, _SIMPLE: 512}
THREAD_THRESHOLD = {_LL: 8, _LL128: 8, _SIMPLE: 64}
NET_OVERHEAD_US = 1.0
P2P_LATENCY_US = 6.0

# Unidirectional bandwidth per GPU (GB/s) of each intra-node link kind, by generation.
INTRA_BW = {
    "nvswitch": {GpuGeneration.volta: 130.0, GpuGeneration.ampere: 240.0,
                 GpuGeneration.hopper: 370.0, GpuGeneration.blackwell: 740.0},
    "nvlink": {GpuGeneration.volta: 75.0, GpuGeneration.ampere: 150.0,
               GpuGeneration.hopper: 150.0, GpuGeneration.blackwell: 300.0},
}
PCIE_BW = {GpuGeneration.volta: 12.0, GpuGeneration.ampere: 24.0,
           GpuGeneration.hopper: 48.0, GpuGeneration.blackwell: 48.0}


def nic_gbits(inter_node: str) -> float:
    """Line rate of one NIC named like `ib-ndr400`, `roce-200`, `ethernet-25` (0 for none)."""
    if inter_node == "none":
        return 0.0
    match = re.search(r"(\d+)\s*$", inter_node)
    return float(match.group(1)) if match else 25.0


@dataclass(frozen=True)
class Topology:
    """What NCCL's topology search would report for a fabric."""

    generation: GpuGeneration
    intra_hw: str  # "nvlink" or "pci"
    intra_bw: float  # GB/s per GPU inside a node
    inter_bw: float  # GB/s a node sends across nodes (all its NICs): what rings and trees share
    channels: int  # ring/tree channels of a communicator
    nvls_channels: int

    @classmethod
    def of(cls, fabric: Fabric) -> Topology:
        generation = gpu_generation(fabric.gpu)
        if fabric.intra_node in INTRA_BW:
            intra_hw, intra_bw = "nvlink", INTRA_BW[fabric.intra_node][generation]
        else:
            intra_hw, intra_bw = "pci", PCIE_BW[generation]
        node_net = nic_gbits(fabric.inter_node) / 8.0 * fabric.nics_per_node * 0.92
        if intra_hw == "nvlink":
            channels = 32 if generation >= GpuGeneration.hopper else 16
        else:
            channels = max(2, 2 * min(fabric.nics_per_node, fabric.gpus_per_node))
        return cls(generation, intra_hw, intra_bw, node_net, channels, 16)

    def cap_index(self, nnodes: int) -> int:
        return 0 if nnodes == 1 else 1 if nnodes == 2 else 2


def _nsteps(coll: Collective, nranks: int, nnodes: int) -> tuple[int, int]:
    """(steps, of which network steps) of a ring."""
    if coll is Collective.allreduce:
        return 2 * (nranks - 1), (2 * nnodes if nnodes > 1 else 0)
    if coll in (Collective.allgather, Collective.reducescatter):
        return nranks - 1, nnodes - 1
    return nranks, nnodes


class NcclCostModel:
    """NCCL's predicted time of a call and the configuration it picks, for one fabric."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.topology = Topology.of(fabric)

    def default_channels(self, algo: Algo | None) -> int:
        if algo in (Algo.nvls, Algo.nvls_tree):
            return self.topology.nvls_channels
        return self.topology.channels

    # ---- the model -------------------------------------------------------------------------
    def _bus_bandwidth(self, context: Context, algo: Algo, proto: Proto, nchannels: int) -> float:
        topo, coll, nnodes = self.topology, context.collective, context.nnodes
        gen, cap = topo.generation, topo.cap_index(nnodes)
        full = self.default_channels(algo)
        nch = min(nchannels, full)
        if algo in (Algo.nvls, Algo.nvls_tree):
            bw = topo.intra_bw * NVLS_EFFICIENCY.get(gen, 0.85)
            if algo is Algo.nvls_tree:
                bw = min(bw, topo.inter_bw * (1.0 if nnodes <= 2 else 0.5))
            return bw * nch / full
        per_channel_speed = (topo.intra_bw if nnodes == 1 else min(topo.intra_bw, topo.inter_bw)) / full
        if algo in (Algo.collnet_direct, Algo.collnet_chain):
            per_channel_speed = topo.intra_bw / full
        bus = nch * per_channel_speed
        if algo is Algo.ring and proto is _LL:
            bus = min(LL_MAX_BW[gen][cap], bus * 0.5)
        if algo is Algo.ring and proto is _LL128:
            bus = min(bus * 0.92, nch * PER_CH_MAX_RING_LL128_BW[gen])
        if algo is Algo.tree and coll is Collective.allreduce:
            bus = min(bus * 0.92, nch * PER_CH_MAX_TREE_BW[gen][cap])
        if algo is Algo.tree and proto is _LL:
            bus = min(bus / 3.8, LL_MAX_BW[gen][cap])
        if algo is Algo.tree and proto is _LL128:
            bus = min(bus * (7.0 / 9.0 if nnodes == 1 else 120.0 / 128.0), nch * PER_CH_MAX_TREE_LL128_BW[gen][cap])
        if algo is Algo.tree:
            bus *= 0.85
        if algo is Algo.pat:
            bus *= 0.75
        if algo in (Algo.collnet_direct, Algo.collnet_chain):
            bus *= 0.9
        return bus

    def algorithm_bandwidth_gbs(self, context: Context, algo: Algo, proto: Proto, nchannels: int) -> float:
        bus = self._bus_bandwidth(context, algo, proto, nchannels)
        coll = context.collective
        if algo is not Algo.ring and coll in (Collective.allgather, Collective.reducescatter):
            return bus
        if algo is Algo.ring:
            steps, _ = _nsteps(coll, context.nranks, context.nnodes)
            return bus * context.nranks / steps
        if algo in (Algo.nvls, Algo.nvls_tree):
            return bus * 5.0 / 6.0
        return bus * 0.5

    def latency_us(self, context: Context, algo: Algo, proto: Proto) -> float:
        p = list(Proto).index(proto)
        coll, nranks, nnodes = context.collective, context.nranks, context.nnodes
        intra_hw = self.topology.intra_hw
        latency = BASE_LATENCY[algo][p]
        intra = HW_LATENCY[intra_hw][algo][p]
        inter = HW_LATENCY["net"][algo][p]
        ppn = nranks / nnodes
        if algo is Algo.ring:
            if coll in (Collective.broadcast, Collective.reduce):
                return latency + HW_LATENCY[intra_hw if nnodes == 1 else "net"][algo][p]
            steps, inter_steps = _nsteps(coll, nranks, nnodes)
            if nnodes > 1:
                intra = max(intra, NET_OVERHEAD_US * (3 if proto is _SIMPLE else 1))
            return latency + (steps - inter_steps) * intra + inter_steps * inter
        if algo is Algo.tree:
            return latency + 2 * ((ppn - 1) * intra + math.log2(nnodes) * inter)
        if algo is Algo.nvls:
            return latency + intra + (inter if nnodes > 1 else 0.0)
        if algo is Algo.nvls_tree:
            return latency + intra + 2 * math.log2(nnodes) * inter
        if algo is Algo.pat:
            return latency + math.log2(nnodes) * inter / 3.5 + nranks * 0.6
        return latency + 2 * (ppn - 1) * intra + inter  # collnet

    def terms(self, context: Context, algo: Algo, proto: Proto, nchannels: int | None) -> tuple[float, float]:
        """(latency in us, algorithm bandwidth in GB/s) NCCL assumes for a collective call,
        its tree correction and ring plateau included; bandwidth 0 where the pair is unusable."""
        if algo not in valid_algorithms(self.fabric, context) or proto not in valid_protocols(self.fabric, algo):
            return math.inf, 0.0
        nch = nchannels or self.default_channels(algo)
        bandwidth = self.algorithm_bandwidth_gbs(context, algo, proto, nch)
        latency = self.latency_us(context, algo, proto)
        if algo is Algo.tree and context.collective is Collective.allreduce:
            log_size = int(math.log2(max(context.nbytes >> 6, 1)))
            if log_size < len(TREE_CORRECTION[proto]):
                bandwidth *= TREE_CORRECTION[proto][log_size]
        if (
            algo is Algo.ring and proto is _SIMPLE and context.nnodes > 1
            and context.collective is Collective.allreduce
            and context.nbytes / (nch * context.nranks) >= 64
        ):
            latency *= 1.9 if self.topology.generation < GpuGeneration.ampere else 1.4
        return latency, bandwidth

    def time_us(self, context: Context, algo: Algo | None, proto: Proto | None, nchannels: int | None) -> float:
        """NCCL's predicted time of one call; inf where the pair is unusable here."""
        if context.nranks == 1:
            return 1.0
        if context.collective.is_p2p:
            return self._p2p_time_us(context, nchannels)
        if algo is None or proto is None:
            resolved = self.resolve(context, NcclConfig(algo=algo, proto=proto, nchannels=nchannels))
            algo, proto, nchannels = resolved.algo, resolved.proto, resolved.nchannels
        latency, bandwidth = self.terms(context, algo, proto, nchannels)
        if bandwidth <= 0:
            return math.inf
        return latency + context.nbytes / (1000.0 * bandwidth)

    def _p2p_time_us(self, context: Context, nchannels: int | None) -> float:
        topo = self.topology
        bw = topo.intra_bw if context.nnodes == 1 else min(topo.intra_bw, topo.inter_bw)
        nch = min(nchannels or topo.channels, topo.channels)
        moved = context.nbytes * (context.nranks - 1) / context.nranks
        latency = P2P_LATENCY_US + (context.nranks - 1 if context.collective is Collective.alltoall else 1) * 0.5
        return latency + moved / (1000.0 * bw * nch / topo.channels)

    # ---- selection -------------------------------------------------------------------------
    def _reduced_channels(self, context: Context, algo: Algo, proto: Proto, channels: int) -> int:
        """NCCL lowers the channel count of small calls until each thread has enough work."""
        threshold = THREAD_THRESHOLD[proto] * (context.nranks if algo is Algo.ring and proto is _LL else 1)
        per_channel = MAX_THREADS[proto] * threshold
        nc = channels
        while nc >= 2 and context.nbytes < nc * per_channel:
            nc -= 1
        return nc

    def _pick(
        self,
        context: Context,
        algos: tuple[Algo, ...],
        protos: tuple[Proto, ...] | None,
        channels: int | None,
    ) -> tuple[Algo, Proto]:
        best: tuple[float, Algo, Proto] | None = None
        for algo in algos:
            for proto in valid_protocols(self.fabric, algo):
                if protos is not None and proto not in protos:
                    continue
                time = self.time_us(context, algo, proto, channels or self.default_channels(algo))
                if best is None or time < best[0]:
                    best = (time, algo, proto)
        if best is None:  # restrictions exclude everything: NCCL falls back to its own choice
            return self._pick(context, valid_algorithms(self.fabric, context), None, channels)
        return best[1], best[2]

    def resolve(self, context: Context, config: NcclConfig) -> NcclConfig:
        """What NCCL runs when told `config`: fields left to NCCL filled as NCCL would.

        An explicit channel count is used as given (what a tuner plugin does)."""
        if context.nranks == 1:
            return NcclConfig()
        if context.collective.is_p2p:
            return NcclConfig(nchannels=config.nchannels or self.topology.channels)
        algos = (config.algo,) if config.algo else valid_algorithms(self.fabric, context)
        protos = (config.proto,) if config.proto else None
        algo, proto = self._pick(context, algos, protos, None)
        channels = config.nchannels or self._reduced_channels(context, algo, proto, self.default_channels(algo))
        return NcclConfig(algo=algo, proto=proto, nchannels=channels)

    def default(self, context: Context) -> NcclConfig:
        return self.resolve(context, NcclConfig())

    def resolve_env(self, context: Context, env: dict[str, str]) -> NcclConfig:
        """What NCCL runs under a process-wide setting rendered by `dynamiccl.nccl.env`.

        NCCL_MIN/MAX_NCHANNELS fix the communicator's channel count; small calls still get
        fewer (NCCL's per-call reduction)."""
        if context.nranks == 1:
            return NcclConfig()
        setting = parse_env(env)
        if context.collective.is_p2p:
            return NcclConfig(nchannels=setting.p2p_nchannels or self.topology.channels)
        valid = valid_algorithms(self.fabric, context)
        wanted = setting.algos.get(context.collective)
        algos = (wanted,) if wanted in valid else valid
        proto = setting.protos.get(context.collective)
        algo, proto = self._pick(context, algos, (proto,) if proto else None, setting.nchannels)
        channels = setting.nchannels or self.default_channels(algo)
        return NcclConfig(algo=algo, proto=proto, nchannels=self._reduced_channels(context, algo, proto, channels))

    def resolve_rules(self, context: Context, rules_text: str) -> NcclConfig:
        """What NCCL runs with the example tuner plugin loaded with these rules: the first
        matching rule's pair if NCCL can run it here, else NCCL's own choice."""
        rule = first_match(parse_rules(rules_text), context)
        if rule is None:
            return self.default(context)
        if rule.algo not in valid_algorithms(self.fabric, context) or rule.proto not in valid_protocols(
            self.fabric, rule.algo
        ):
            return self.default(context)
        return self.resolve(context, rule.config)


def bus_bandwidth_gbs(context: Context, latency_us: float) -> float:
    """nccl-tests' busbw (GB/s): algbw = size / time times the collective's bus factor."""
    n = context.nranks
    factor = {
        Collective.allreduce: 2 * (n - 1) / n,
        Collective.allgather: (n - 1) / n,
        Collective.reducescatter: (n - 1) / n,
        Collective.alltoall: (n - 1) / n,
    }.get(context.collective, 1.0)
    return context.nbytes / (latency_us * 1e3) * factor

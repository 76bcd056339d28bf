"""NCCL's own cost model and selection (NVIDIA/nccl 2.28: src/graph/tuning.cc, src/enqueue.cc).

NCCL predicts, per collective, algorithm and protocol,

    time = latency(algo, proto) + nBytes / (1000 * algBw(algo, proto))      (us, GB/s)

* latency: a base latency plus per-step hardware latencies (NVLink, PCI,
  network); rings count their steps, trees 2(ppn-1) intra steps and
  2 log2(nodes) network steps; a ring "plateau" factor for large multi-node
  Simple allreduces; a tree correction factor for medium sizes.
* bandwidth: the topology search's channels times their speed, capped per
  protocol (LL at half speed and an absolute cap, LL128 at 0.92 and a
  per-channel cap, tree at 0.92 and a per-channel cap, NVLS scaled by an
  efficiency and pipelining), converted from bus to algorithm bandwidth.
* selection: the cheapest usable pair on NCCL's table; then, for small calls,
  NCCL lowers the channel count until each thread has enough work
  (`while nBytes < nc * nthreads * threshold: nc--`, NVLS excepted).

NCCL does not model the channel count of a call: its table assumes all of
the communicator's channels. To say something about a call forced onto
fewer channels we put the share of channels used into NCCL's own formula
(busBw = nChannels * per-channel speed, per-channel caps scaled alike,
absolute caps such as LL's kept), capped at the full count.

The topology is what NCCL's search would report for a `Fabric` (wire
fields only): see `Topology`. This is NCCL's model only; it knows nothing of
how any real or simulated fabric departs from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dynamiccl.nccl.env import read_env
from dynamiccl.nccl.space import GpuGeneration, InvalidConfig, gpu_generation, valid_algorithms, valid_protocols
from dynamiccl.nccl.tuner_rules import applied_rule, parse_rules
from dynamiccl.schemas import Algo, Collective, Context, Fabric, NcclConfig, Proto

_LL, _LL128, _SIMPLE = Proto.ll, Proto.ll128, Proto.simple
_NVLS = (Algo.nvls, Algo.nvls_tree)
_COLLNET = (Algo.collnet_direct, Algo.collnet_chain)

# ---- NCCL's tuning constants (ncclTunerConstantsDefaults), protocols in the order LL, LL128, Simple
BASE_LATENCY: dict[Algo, tuple[float, float, float]] = {
    Algo.tree: (6.8, 14.0, 8.4), Algo.ring: (6.6, 14.0, 8.4),
    Algo.collnet_direct: (0.0, 0.0, 0.0), Algo.collnet_chain: (0.0, 0.0, 0.0),
    Algo.nvls: (0.0, 0.0, 0.0), Algo.nvls_tree: (0.0, 0.0, 0.0),
    Algo.pat: (8.0, 8.0, 8.0),
}
HW_LATENCY: dict[str, dict[Algo, tuple[float, float, float]]] = {
    "nvlink": {
        Algo.tree: (0.6, 1.25, 4.0), Algo.ring: (0.6, 1.9, 3.4),
        Algo.collnet_direct: (0.0, 0.0, 3.7), Algo.collnet_chain: (0.0, 0.0, 2.8),
        Algo.nvls: (0.0, 0.0, 25.0), Algo.nvls_tree: (0.0, 0.0, 25.0), Algo.pat: (0.0, 0.0, 4.0),
    },
    "pci": {
        Algo.tree: (1.0, 1.9, 4.0), Algo.ring: (1.0, 2.5, 5.7),
        Algo.collnet_direct: (0.0, 0.0, 3.7), Algo.collnet_chain: (0.0, 0.0, 2.8),
        Algo.nvls: (0.0, 0.0, 0.0), Algo.nvls_tree: (0.0, 0.0, 0.0), Algo.pat: (0.0, 0.0, 4.0),
    },
    "net": {
        Algo.tree: (5.0, 8.5, 14.0), Algo.ring: (2.7, 4.0, 14.0),
        Algo.collnet_direct: (0.0, 0.0, 31.0), Algo.collnet_chain: (0.0, 0.0, 30.0),
        Algo.nvls: (0.0, 0.0, 18.0), Algo.nvls_tree: (0.0, 0.0, 20.9), Algo.pat: (0.0, 0.0, 14.0),
    },
}
# Indexed [row][1 node, 2 nodes, more]. LL's cap row is the GPU generation on one node and the CPU
# vendor across nodes (row 0 for Intel, 1 for AMD); we assume Intel hosts (DGX H100/A100).
LL_MAX_BW: dict[int, tuple[float, float, float]] = {
    0: (39.0, 39.0, 20.4), 1: (87.7, 22.5, 19.0), 2: (141.0, 45.0, 35.0), 3: (282.0, 90.0, 70.0),
}
_GEN_ROW = {GpuGeneration.volta: 0, GpuGeneration.ampere: 1, GpuGeneration.hopper: 2, GpuGeneration.blackwell: 3}
PER_CH_MAX_RING_LL128_BW = {0: (20.0,) * 3, 1: (20.0,) * 3, 2: (36.7,) * 3, 3: (40.0,) * 3}
PER_CH_MAX_TREE_LL128_BW = {0: (20.0,) * 3, 1: (20.0,) * 3, 2: (36.7, 36.7, 29.0), 3: (55.6, 31.67, 20.0)}
PER_CH_MAX_TREE_BW = {0: (26.5, 18.5, 10.0), 1: (24.0, 23.6, 17.8), 2: (38.7, 41.4, 36.0), 3: (70.0, 42.8, 24.0)}
PER_CH_MAX_NVLS_TREE_BW = {0: (26.5, 18.5, 10.0), 1: (24.0, 23.6, 17.8), 2: (0.0, 57.7, 45.5), 3: (0.0, 96.0, 80.0)}
NVLS_EFFICIENCY = {GpuGeneration.hopper: 0.85, GpuGeneration.blackwell: 0.74}
# Tree bandwidth correction for medium sizes, per protocol, indexed by log2(nBytes >> 6) < 23.
TREE_CORRECTION: dict[Proto, tuple[float, ...]] = {
    _LL: (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0),
    _LL128: (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0),
    _SIMPLE: (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9),
}
# Threads per channel (NCCL_{LL,LL128,SIMPLE}_MAX_NTHREADS) and bytes per thread before adding a channel.
MAX_THREADS = {_LL: 512, _LL128: 640, _SIMPLE: 512}
THREAD_THRESHOLD = {_LL: 8, _LL128: 8, _SIMPLE: 64}
NET_OVERHEAD_US = 1.0  # getNetOverhead on Intel hosts; Simple pays it three times
P2P_LATENCY_US = 6.0  # not in NCCL's table (it has no p2p model); a plausible per-call cost

# ---- what NCCL's topology search finds (search.cc speed arrays, topo.h link speeds)
#: Single-node ring/tree graph: (search channels, GB/s per channel) by link kind and generation.
#: H100: 18 NVLinks of 20.6 GB/s; A100: 12 of 20 GB/s (search gives 12 x 20, hence 24 channels).
INTRA_GRAPH: dict[str, dict[GpuGeneration, tuple[int, float]]] = {
    "nvswitch": {GpuGeneration.volta: (6, 20.0), GpuGeneration.ampere: (12, 20.0),
                 GpuGeneration.hopper: (16, 22.5), GpuGeneration.blackwell: (16, 45.0)},
    "nvlink": {GpuGeneration.volta: (4, 20.0), GpuGeneration.ampere: (4, 20.0),
               GpuGeneration.hopper: (6, 20.0), GpuGeneration.blackwell: (6, 40.0)},
    "pcie": {GpuGeneration.volta: (2, 6.0), GpuGeneration.ampere: (2, 12.0),
             GpuGeneration.hopper: (2, 24.0), GpuGeneration.blackwell: (2, 24.0)},
}
#: NVLS graph on one node: at most 8 channels (NCCL_MAX_NVLS_ARITY) at this speed; 16 NVLS CTAs run them.
NVLS_GRAPH_SPEED = {GpuGeneration.hopper: 40.0, GpuGeneration.blackwell: 80.0}
NVLS_CHANNELS = 16
#: Top speed NCCL's inter-node search assigns a 400 Gb/s NIC (sm90SpeedArrayInter starts at 48).
NIC_EFFICIENCY = 0.96
UNKNOWN_NIC_GBITS = 25.0


def nic_gbits(inter_node: str) -> float:
    """Line rate of one NIC named like `ib-ndr400`, `roce-200`, `ethernet-25` (0 for none).

    Unknown names without a trailing number count as 25 Gb/s (the conservative side)."""
    if inter_node == "none":
        return 0.0
    match = re.search(r"(\d+)\s*$", inter_node)
    return float(match.group(1)) if match else UNKNOWN_NIC_GBITS


@dataclass(frozen=True)
class Graph:
    """One topology search result: search channels and their speed (GB/s) inside and across nodes."""

    channels: int
    bw_intra: float
    bw_inter: float

    @property
    def total(self) -> float:
        return self.channels * self.bw_intra


@dataclass(frozen=True)
class Topology:
    """What NCCL's topology search would report for a fabric, for one- and multi-node communicators.

    Inside a node the ring (and tree) graph comes from `INTRA_GRAPH`. Across nodes every search
    channel runs through one NIC at the NIC's speed (one channel per NIC, up to one NIC per GPU),
    bounded by the intra-node speed. Execution channels are twice the search channels (connectRings
    duplicates them); Hopper and newer double them again across nodes when a channel runs faster
    than 45 GB/s and there are fewer than 16 (connect.cc). Unknown link kinds count as PCIe.
    """

    generation: GpuGeneration
    intra_hw: str  # "nvlink" or "pci": which hardware latency row NCCL uses
    node_graph: Graph
    net_graph: Graph | None  # None when the fabric has no network
    nvls_graph: Graph | None  # None unless NVLS-capable (NVSwitch, Hopper or newer)

    @classmethod
    def of(cls, fabric: Fabric) -> Topology:
        generation = gpu_generation(fabric.gpu)
        kind = fabric.intra_node if fabric.intra_node in INTRA_GRAPH else "pcie"
        channels, speed = INTRA_GRAPH[kind][generation]
        node_graph = Graph(channels, speed, speed)
        net_graph = None
        nic = nic_gbits(fabric.inter_node) / 8.0 * NIC_EFFICIENCY
        if nic > 0 and fabric.nics_per_node > 0:
            nics = min(fabric.nics_per_node, fabric.gpus_per_node)
            per_channel = min(nic, node_graph.total / nics)
            net_graph = Graph(nics, per_channel, per_channel)
        nvls_graph = None
        if kind == "nvswitch" and generation in NVLS_EFFICIENCY:
            nvls_speed = NVLS_GRAPH_SPEED[generation]
            nvls_channels = min(8, fabric.gpus_per_node)
            nvls_inter = net_graph.total / nvls_channels if net_graph else 0.0
            nvls_graph = Graph(nvls_channels, nvls_speed, nvls_inter)
        return cls(generation, "nvlink" if kind in ("nvswitch", "nvlink") else "pci", node_graph, net_graph,
                   nvls_graph)

    def graph(self, nnodes: int) -> Graph:
        """The ring/tree graph of a communicator spanning `nnodes` nodes."""
        if nnodes > 1 and self.net_graph is not None:
            return self.net_graph
        return self.node_graph

    def channels(self, nnodes: int) -> int:
        """The communicator's (execution) channel count for ring and tree."""
        graph = self.graph(nnodes)
        channels = 2 * graph.channels
        if nnodes > 1 and self.generation >= GpuGeneration.hopper and graph.bw_intra > 45.0 and channels < 16:
            channels *= 2
        return min(channels, 64)

    def default_channels(self, algo: Algo | None, nnodes: int) -> int:
        return NVLS_CHANNELS if algo in _NVLS else self.channels(nnodes)


def _cap_index(nnodes: int) -> int:
    return 0 if nnodes == 1 else 1 if nnodes == 2 else 2


def _log2i(value: float) -> int:
    return int(math.log2(value)) if value >= 1 else 0


class NcclCostModel:
    """NCCL's predicted time of a call and the configuration it runs, for one fabric."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.topology = Topology.of(fabric)

    def default_channels(self, algo: Algo | None, nnodes: int) -> int:
        """Channels NCCL gives `algo` on a communicator of `nnodes` nodes before per-call reduction."""
        return self.topology.default_channels(algo, nnodes)

    # ---- the model -------------------------------------------------------------------------
    def usable(self, context: Context, algo: Algo, proto: Proto) -> bool:
        """Whether NCCL's table holds a time for this pair (valid here and enabled by default)."""
        if algo not in valid_algorithms(self.fabric, context) or proto not in valid_protocols(self.fabric, algo):
            return False
        if algo is Algo.nvls_tree and self.topology.net_graph is None:
            return False
        return self._bus_bandwidth(context, algo, proto) > 0

    def _bus_bandwidth(self, context: Context, algo: Algo, proto: Proto, share: float = 1.0) -> float:
        """NCCL's bus bandwidth (GB/s) for a pair (tuning.cc refinements), on `share` of the channels."""
        topo, coll, nnodes = self.topology, context.collective, context.nnodes
        row, cap = _GEN_ROW[topo.generation], _cap_index(nnodes)
        ppn = context.nranks / nnodes
        if algo in _NVLS:
            graph = topo.nvls_graph
            if graph is None or graph.channels < 2:
                return 0.0
            intra = graph.bw_intra * NVLS_EFFICIENCY[topo.generation] * (graph.channels - 1) / graph.channels
            intra *= 2.0 if coll is Collective.allreduce else (ppn - 1) / ppn
            inter = graph.bw_inter * (2.0 if nnodes <= 2 and algo is Algo.nvls_tree else 1.0)
            per_channel = min(intra, inter) if nnodes > 1 else intra
            if algo is Algo.nvls_tree:
                per_channel = min(per_channel, PER_CH_MAX_NVLS_TREE_BW[row][cap])
            return graph.channels * share * per_channel
        graph = topo.graph(nnodes)
        channels = graph.channels * share
        speed = graph.bw_intra if nnodes <= 2 or algo in _COLLNET else graph.bw_inter
        bus = channels * speed
        ll_row = row if nnodes == 1 else 0
        if algo is Algo.ring and proto is _LL:
            bus = min(LL_MAX_BW[ll_row][cap], bus * 0.5)
        if algo is Algo.ring and proto is _LL128:
            bus = min(bus * 0.92, channels * PER_CH_MAX_RING_LL128_BW[row][cap])
        if algo is Algo.tree and coll is Collective.allreduce:
            bus = min(bus * 0.92, channels * PER_CH_MAX_TREE_BW[row][cap])
        if algo is Algo.tree and proto is _LL:
            bus = min(bus / 3.8, LL_MAX_BW[ll_row][cap])
        if algo is Algo.tree and proto is _LL128:
            factor = 7.0 / 9.0 if nnodes == 1 else 120.0 / 128.0
            bus = min(bus * factor, channels * PER_CH_MAX_TREE_LL128_BW[row][cap])
        if algo is Algo.pat:
            bus *= 0.75
        if algo in _COLLNET:
            bus *= 0.9
        return bus

    def _algorithm_bandwidth(self, context: Context, algo: Algo, proto: Proto, share: float) -> float:
        bus = self._bus_bandwidth(context, algo, proto, share)
        coll, nranks = context.collective, context.nranks
        if algo is not Algo.ring and coll in (Collective.allgather, Collective.reducescatter):
            return bus
        if algo is Algo.ring or algo in _NVLS:
            nsteps = 2 * (nranks - 1) if coll is Collective.allreduce else (
                nranks - 1 if coll in (Collective.allgather, Collective.reducescatter) else nranks)
            return bus * nranks / nsteps
        return bus * 0.5

    def _latency(self, context: Context, algo: Algo, proto: Proto) -> float:
        p = (_LL, _LL128, _SIMPLE).index(proto)
        coll, nranks, nnodes = context.collective, context.nranks, context.nnodes
        ppn = nranks // nnodes
        intra = HW_LATENCY[self.topology.intra_hw][algo][p]
        # with one GPU per node network latencies are fully exposed: NCCL uses the tree's
        inter = HW_LATENCY["net"][Algo.tree if ppn == 1 else algo][p]
        latency = BASE_LATENCY[algo][p]
        if algo is Algo.ring:
            if coll in (Collective.broadcast, Collective.reduce):
                return latency + HW_LATENCY["net" if nnodes > 1 else self.topology.intra_hw][algo][p]
            nsteps = 2 * (nranks - 1) if coll is Collective.allreduce else nranks - 1
            inter_steps = 0 if nnodes == 1 else 2 * (nnodes - 1) if coll is Collective.allreduce else nnodes - 1
            if nnodes > 1:
                intra = max(intra, NET_OVERHEAD_US * (3 if proto is _SIMPLE else 1))
            return latency + (nsteps - inter_steps) * intra + inter_steps * inter
        if algo is Algo.tree:
            return latency + 2 * ((ppn - 1) * intra + _log2i(nnodes) * inter)
        if algo is Algo.nvls:
            return intra + (inter if nnodes > 1 else 0.0)
        if algo is Algo.nvls_tree:
            return latency + intra + 2 * _log2i(nnodes) * inter
        if algo is Algo.pat:
            return latency + _log2i(nnodes) * inter / 3.5 + nranks * 2.8
        if algo is Algo.collnet_direct:
            return latency + 2 * (min(1, ppn - 1) * intra + (ppn - 1) * 0.4) + inter
        return latency + 2 * (ppn - 1) * intra + inter  # collnet chain

    def terms(self, context: Context, algo: Algo, proto: Proto, nchannels: float | None) -> tuple[float, float]:
        """(latency in us, algorithm bandwidth in GB/s) NCCL assumes for a collective call on
        `nchannels` channels (None: all of them; fractional counts allowed for callers that
        model effective channels), tree correction and ring plateau included; (inf, 0) where the
        pair is unusable here."""
        if not self.usable(context, algo, proto):
            return math.inf, 0.0
        full = self.default_channels(algo, context.nnodes)
        nch = min(nchannels or full, full)
        bandwidth = self._algorithm_bandwidth(context, algo, proto, nch / full)
        latency = self._latency(context, algo, proto)
        log_size = _log2i(context.nbytes >> 6)
        if algo is Algo.tree and context.collective is Collective.allreduce and log_size < 23:
            bandwidth *= TREE_CORRECTION[proto][log_size]
        if (
            algo is Algo.ring and proto is _SIMPLE and context.nnodes > 1
            and context.collective is Collective.allreduce
            and context.nbytes / (full * context.nranks) >= 64
        ):
            latency *= 1.9 if self.topology.generation < GpuGeneration.ampere else 1.4  # ring plateau
        return latency, bandwidth

    def time_us(self, context: Context, algo: Algo | None, proto: Proto | None, nchannels: int | None) -> float:
        """NCCL's predicted time (us) of one call; inf where the pair is unusable here.

        None fields are resolved as NCCL would first. Point-to-point calls (NCCL has no model
        for them) get a plain latency + bytes / link bandwidth estimate."""
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
        graph = self.topology.graph(context.nnodes)
        full = self.topology.channels(context.nnodes)
        nch = min(nchannels or full, full)
        moved = context.nbytes * (context.nranks - 1) / context.nranks
        peers = context.nranks - 1 if context.collective is Collective.alltoall else 1
        return P2P_LATENCY_US + 0.5 * peers + moved / (1000.0 * graph.total * nch / full)

    # ---- selection -------------------------------------------------------------------------
    def reduced_channels(self, context: Context, algo: Algo, proto: Proto, channels: int) -> int:
        """NCCL's per-call channel count: fewer channels for small calls (NVLS keeps its own)."""
        if algo in _NVLS:
            return channels
        threshold = THREAD_THRESHOLD[proto] * (context.nranks if algo is Algo.ring and proto is _LL else 1)
        per_channel = MAX_THREADS[proto] * threshold
        nc = channels
        while nc >= 2 and context.nbytes < nc * per_channel:
            nc -= 1
        return nc

    def _pairs(self, context: Context, algos: Iterable[Algo] | None = None,
               protos: Iterable[Proto] | None = None) -> list[tuple[Algo, Proto]]:
        """The usable pairs among those enabled (None: all), in NCCL's order."""
        enabled_algos = None if algos is None else set(algos)
        enabled_protos = None if protos is None else set(protos)
        return [(a, p) for a in valid_algorithms(self.fabric, context) for p in Proto
                if (enabled_algos is None or a in enabled_algos) and (enabled_protos is None or p in enabled_protos)
                and self.usable(context, a, p)]

    def _argmin(self, context: Context, pairs: list[tuple[Algo, Proto]], nchannels: int | None) -> tuple[Algo, Proto]:
        """NCCL's pick: the cheapest pair on its table (first one on ties, in NCCL's order)."""
        return min(pairs, key=lambda pair: self.time_us(context, *pair, nchannels))

    def resolve(self, context: Context, config: NcclConfig) -> NcclConfig:
        """What NCCL runs when told `config`: fields left to NCCL filled as NCCL would.

        An explicit channel count is used as given (what a tuner plugin does). A config NCCL
        cannot run raises InvalidConfig."""
        if context.nranks == 1:
            return NcclConfig()
        if context.collective.is_p2p:
            return NcclConfig(nchannels=config.nchannels or self.topology.channels(context.nnodes))
        pairs = self._pairs(
            context,
            None if config.algo is None else (config.algo,),
            None if config.proto is None else (config.proto,),
        )
        if not pairs:
            raise InvalidConfig(f"NCCL cannot run {config.label()} for {context.collective.value} here")
        algo, proto = self._argmin(context, pairs, None)
        channels = config.nchannels or self.reduced_channels(
            context, algo, proto, self.default_channels(algo, context.nnodes))
        return NcclConfig(algo=algo, proto=proto, nchannels=channels)

    def default(self, context: Context) -> NcclConfig:
        return self.resolve(context, NcclConfig())

    def resolve_env(self, context: Context, env: Mapping[str, str]) -> NcclConfig:
        """What NCCL runs under a process environment (`dynamiccl.nccl.env.read_env`).

        NCCL_ALGO / NCCL_PROTO leave only the algorithms / protocols they enable for that
        collective (a name, a list, or all but an exclusion), and NCCL picks the cheapest of
        those; the channel bounds (NCCL_MIN/MAX_CTAS, or the older NCHANNELS names) clamp the
        communicator's count (NVLS's too), and small calls still get fewer channels. When nothing
        enabled can run the call, NCCL fails it ("No algorithm/protocol available"): InvalidConfig."""
        if context.nranks == 1:
            return NcclConfig()
        nccl_env = read_env(env)
        if context.collective.is_p2p:
            return NcclConfig(nchannels=nccl_env.p2p_nchannels or self.topology.channels(context.nnodes))
        pairs = self._pairs(context, nccl_env.algos.get(context.collective), nccl_env.protos.get(context.collective))
        if not pairs:
            raise InvalidConfig(
                f"NCCL fails {context.collective.value} on {context.nnodes} node(s) under {dict(env)}: "
                "no enabled algorithm/protocol can run it")
        pinned = nccl_env.pinned_channels
        algo, proto = self._argmin(context, pairs, pinned)
        channels = pinned or nccl_env.clamp_channels(self.default_channels(algo, context.nnodes))
        return NcclConfig(algo=algo, proto=proto, nchannels=self.reduced_channels(context, algo, proto, channels))

    def resolve_rules(self, context: Context, rules_text: str, example_plugin: bool = False) -> NcclConfig:
        """What NCCL runs with a tuner plugin loaded with these rules (numPipeOps 1, regBuff 0).

        Both DynamICCL's plugin (agent/plugin/dynamiccl_tuner.c) and NCCL's example
        plugin apply `applied_rule` (the first match whose pair NCCL offers): its pair gets cost
        0, so NCCL runs it. DynamICCL's plugin runs it on the rule's channel count or, with -1,
        on NCCL's own count for the pair, and leaves a call without an applied rule to NCCL,
        untouched. NCCL's example plugin (`example_plugin`; plugins/tuner/example/plugin.c,
        NCCL 2.22 to 2.30) answers one channel unless the rule sets a count, and NCCL uses the
        plugin's count: a call no rule applies to, or one whose rule has channels -1, runs on
        ONE channel."""
        if context.nranks == 1:
            return NcclConfig()
        if context.collective.is_p2p:
            return self.default(context)  # the plugin is asked about collectives only
        rule = applied_rule(parse_rules(rules_text), context, lambda algo, proto: self.usable(context, algo, proto))
        if example_plugin:
            pairs = [(rule.algo, rule.proto)] if rule else self._pairs(context)
            algo, proto = self._argmin(context, pairs, None)
            return NcclConfig(algo=algo, proto=proto, nchannels=rule.nchannels if rule and rule.nchannels else 1)
        if rule is None:
            return self.default(context)
        return self.resolve(context, rule.config)


def bus_factor(collective: Collective, nranks: int) -> float:
    """nccl-tests' bus bandwidth factor: 2(n-1)/n for allreduce, (n-1)/n for allgather,
    reducescatter and alltoall, 1 for broadcast, reduce and send/recv."""
    if collective == Collective.allreduce:
        return 2 * (nranks - 1) / nranks
    if collective in (Collective.allgather, Collective.reducescatter, Collective.alltoall):
        return (nranks - 1) / nranks
    return 1.0


def bus_bandwidth_gbs(context: Context, latency_us: float) -> float:
    """nccl-tests' busbw (GB/s): algbw = size / time, times the collective's bus factor."""
    return context.nbytes / (latency_us * 1e3) * bus_factor(context.collective, context.nranks)

"""Which NCCL configurations a fabric can run for a collective call.

The rules follow NCCL's own (shared/design/NCCL.md, NVIDIA/nccl src/graph and
src/enqueue.cc): NVLS needs an NVSwitch system of Hopper or newer and runs
Simple only; PAT needs one GPU per node; CollNet needs in-network reduction;
LL128 needs NVLink-class links; LL and LL128 are never combined with NVLS,
CollNet or PAT; point-to-point operations only take a channel count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

from dynamiccl.schemas import Algo, Collective, Context, Fabric, NcclConfig, Proto

#: Channel counts the tuner considers besides "NCCL decides" (None).
CHANNEL_GRID: tuple[int, ...] = (2, 4, 8, 16, 24, 32)

_SIMPLE_ONLY = frozenset({Algo.nvls, Algo.nvls_tree, Algo.collnet_direct, Algo.collnet_chain, Algo.pat})


class InvalidConfig(ValueError):
    """A configuration NCCL would refuse (or silently ignore) for this fabric and call."""


class GpuGeneration(IntEnum):
    """NCCL's compute-capability classes (its tables index Volta, Ampere, Hopper, Blackwell)."""

    volta = 70
    ampere = 80
    hopper = 90
    blackwell = 100


_GENERATION_PATTERNS: tuple[tuple[str, GpuGeneration], ...] = (
    (r"\b(g?b\d{3}|rtx ?pro ?6000)", GpuGeneration.blackwell),
    (r"\b(h100|h200|h800|h20|gh200)", GpuGeneration.hopper),
    (r"\b(a100|a800|a10|a30|a40|l40s?|l4|rtx ?a6000|rtx ?6000)", GpuGeneration.ampere),
)


@lru_cache(maxsize=1024)
def gpu_generation(gpu: str) -> GpuGeneration:
    """NCCL's class for a GPU model name; unknown names count as the oldest (the safe side)."""
    name = gpu.lower().replace("-", " ").replace("_", " ")
    for pattern, generation in _GENERATION_PATTERNS:
        if re.search(pattern, name):
            return generation
    return GpuGeneration.volta


@dataclass(frozen=True)
class FabricTraits:
    """What the validity rules need to know about a fabric."""

    generation: GpuGeneration
    nvswitch: bool
    nvlink_class: bool
    sharp: bool

    @staticmethod
    @lru_cache(maxsize=1024)
    def of(fabric: Fabric) -> FabricTraits:
        return FabricTraits(
            generation=gpu_generation(fabric.gpu),
            nvswitch=fabric.intra_node == "nvswitch",
            nvlink_class=fabric.intra_node in ("nvswitch", "nvlink"),
            sharp=fabric.sharp,
        )

    @property
    def nvls_capable(self) -> bool:
        return self.nvswitch and self.generation >= GpuGeneration.hopper


@lru_cache(maxsize=65536)
def valid_algorithms(fabric: Fabric, context: Context) -> tuple[Algo, ...]:
    """Algorithms NCCL can run for this call on this fabric (empty for point-to-point)."""
    traits = FabricTraits.of(fabric)
    coll = context.collective
    multi_node = context.nnodes > 1
    if coll.is_p2p or context.nranks == 1:
        return ()
    if coll is Collective.allreduce:
        algos = [Algo.ring, Algo.tree]
        if traits.nvls_capable:
            algos.append(Algo.nvls_tree if multi_node else Algo.nvls)
        if traits.sharp and multi_node:
            algos += [Algo.collnet_direct, Algo.collnet_chain]
        return tuple(algos)
    if coll in (Collective.allgather, Collective.reducescatter):
        algos = [Algo.ring]
        if traits.nvls_capable and not multi_node:
            algos.append(Algo.nvls)
        if context.nranks == context.nnodes:
            algos.append(Algo.pat)
        return tuple(algos)
    return (Algo.ring,)  # broadcast, reduce


@lru_cache(maxsize=4096)
def valid_protocols(fabric: Fabric, algo: Algo) -> tuple[Proto, ...]:
    if algo in _SIMPLE_ONLY:
        return (Proto.simple,)
    if FabricTraits.of(fabric).nvlink_class:
        return (Proto.ll, Proto.ll128, Proto.simple)
    return (Proto.ll, Proto.simple)


def check_config(fabric: Fabric, context: Context, config: NcclConfig) -> None:
    """Raise InvalidConfig, saying why, unless NCCL can run `config` for this call."""
    if config.is_default:
        return
    coll = context.collective.value
    if context.nranks == 1 and not config.is_default:
        raise InvalidConfig("a communicator of one rank runs no kernels: only the NCCL default applies")
    if context.collective.is_p2p:
        if config.algo is not None or config.proto is not None:
            raise InvalidConfig(f"{coll} is point-to-point: only nchannels can be set")
        return
    algos = valid_algorithms(fabric, context)
    if config.algo is not None and config.algo not in algos:
        allowed = ", ".join(a.value for a in algos)
        raise InvalidConfig(f"algo {config.algo.value} cannot run {coll} here (valid: {allowed})")
    if config.proto is not None:
        candidates = [config.algo] if config.algo is not None else list(algos)
        if not any(config.proto in valid_protocols(fabric, a) for a in candidates):
            raise InvalidConfig(
                f"proto {config.proto.value} cannot be used with "
                f"{config.algo.value if config.algo else 'any valid algorithm'} for {coll} here"
            )


def is_valid(fabric: Fabric, context: Context, config: NcclConfig) -> bool:
    try:
        check_config(fabric, context, config)
    except InvalidConfig:
        return False
    return True


@lru_cache(maxsize=65536)
def candidate_configs(
    fabric: Fabric, context: Context, channels: tuple[int, ...] = CHANNEL_GRID
) -> tuple[NcclConfig, ...]:
    """Every configuration the tuner may try for this call, the NCCL default first."""
    configs = [NcclConfig()]
    if context.nranks == 1:
        return tuple(configs)
    channel_options: list[int | None] = [None, *channels]
    if context.collective.is_p2p:
        configs += [NcclConfig(nchannels=c) for c in channels]
        return tuple(configs)
    for algo in valid_algorithms(fabric, context):
        for proto in valid_protocols(fabric, algo):
            configs += [NcclConfig(algo=algo, proto=proto, nchannels=c) for c in channel_options]
    return tuple(configs)

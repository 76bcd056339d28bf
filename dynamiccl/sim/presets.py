"""Simulated clusters: a fabric, its size and the communicator node counts worth covering."""

from __future__ import annotations

from dataclasses import dataclass

from dynamiccl.schemas import Algo, Fabric, Proto
from dynamiccl.sim.truth import Effects


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    fabric: Fabric
    nodes: int  # nodes in the cluster
    node_counts: tuple[int, ...]  # communicator sizes (in nodes) a benchmark should cover
    seed: int  # seeds the fabric's own departures from the model (two clusters are never alike)
    effects: Effects = Effects()
    #: Factors on the cost-model times the cluster's NCCL chooses by (its version's constants).
    nccl_choice_bias: tuple[tuple[Algo, Proto, float], ...] = ()


def _h100(inter: str) -> Fabric:
    return Fabric(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch", inter_node=inter,
                  nics_per_node=8, nccl_version="2.28.9")


_PRESETS = (
    Preset("h100-ib-1n", "1 node of 8x H100 SXM, NVSwitch", _h100("ib-ndr400"), 1, (1,), 11),
    Preset("h100-ib-2n", "2 nodes of 8x H100 SXM, NVSwitch, 8x 400G InfiniBand", _h100("ib-ndr400"), 2, (2,), 12),
    Preset("h100-ib-4n", "4 nodes of 8x H100 SXM, NVSwitch, 8x 400G InfiniBand", _h100("ib-ndr400"), 4, (2, 4), 13),
    Preset("h100-ib-16n", "16 nodes of 8x H100 SXM, NVSwitch, 8x 400G InfiniBand", _h100("ib-ndr400"), 16, (4, 16), 14),
    Preset(
        "a100-ib-2n", "2 nodes of 8x A100 SXM4, NVSwitch, 8x 200G InfiniBand",
        Fabric(gpu="A100-SXM4-80GB", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-hdr200",
               nics_per_node=8, nccl_version="2.21.5"),
        2, (1, 2), 21,
    ),
    Preset(
        "l40s-roce-2n", "2 nodes of 4x L40S on PCIe, one 200G RoCE NIC each",
        Fabric(gpu="L40S", gpus_per_node=4, intra_node="pcie", inter_node="roce-200",
               nics_per_node=1, nccl_version="2.21.5"),
        2, (1, 2), 31,
    ),
    Preset("h100-roce-4n", "4 nodes of 8x H100 SXM, NVSwitch, 8x 400G RoCE", _h100("roce-400"), 4, (2, 4), 41),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


class UnknownPreset(KeyError):
    def __str__(self) -> str:
        return f"unknown preset {self.args[0]!r}; known: {', '.join(PRESETS)}"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPreset(name) from None

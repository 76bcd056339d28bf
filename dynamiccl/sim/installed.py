"""The NCCL a simulated cluster runs: its choices may differ from the cost model the server knows.

NCCL's tuning constants change between versions (and with a site's own patches), so the
algorithm and protocol NCCL really picks for a call need not be what
`dynamiccl.nccl.cost_model` predicts. `InstalledNccl` is that cost model with its own
per-(algorithm, protocol) factors on the predicted times it chooses by; the physics of a
call (`TrueModel`) does not change with them, only which pair runs where nothing forces one.
"""

from __future__ import annotations

from collections.abc import Mapping

from dynamiccl.nccl.cost_model import NcclCostModel
from dynamiccl.schemas import Algo, Context, Fabric, Proto


class InstalledNccl(NcclCostModel):
    def __init__(self, fabric: Fabric, choice_bias: Mapping[tuple[Algo, Proto], float] | None = None) -> None:
        super().__init__(fabric)
        self.choice_bias = dict(choice_bias or {})

    def _argmin(self, context: Context, pairs: list[tuple[Algo, Proto]], nchannels: int | None) -> tuple[Algo, Proto]:
        return min(pairs, key=lambda pair: self.time_us(context, *pair, nchannels) * self.choice_bias.get(pair, 1.0))

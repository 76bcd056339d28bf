"""Tensor parallelism by PyTorch's DTensor, as torchtitan-style training scripts write it.

The model is built whole (one tensor-parallel rank: plain `nn.Linear`
layers) and `parallelize_module` then splits each block over the group's
device mesh: the query, key, value, gate and up projections by output
columns (`ColwiseParallel`), the attention output and down projections by
input rows (`RowwiseParallel`). The embedding, the output layer and the norms
stay replicated. DTensor issues its collectives as functional collectives:
per block and micro-batch, an all-reduce of the attention output and one of
the MLP output forward, and backward one of the input gradient of each
column-split projection (five: q, k and v each reduce their own, unlike the
Megatron layout's one before the three; `trace.step_trace` counts them).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from dynamiccl.workloads.model import Stage

#: Per block, how DTensor splits each linear layer.
BLOCK_PLAN = {
    "attention.q": ColwiseParallel(), "attention.k": ColwiseParallel(), "attention.v": ColwiseParallel(),
    "attention.out": RowwiseParallel(),
    "mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(),
}


def parallelize_blocks(stage: Stage, mesh: DeviceMesh) -> Stage:
    """Split `stage`'s blocks (built for one tensor-parallel rank) over `mesh`, in place."""
    size = mesh.size()
    for block in stage.blocks:
        parallelize_module(block, mesh, BLOCK_PLAN)
        block.attention.heads //= size  # each rank now computes its share of the heads
        block.attention.kv_heads //= size
    return stage

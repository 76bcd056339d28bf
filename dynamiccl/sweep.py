"""Message sizes of an nccl-tests-style sweep, shared by the simulated and the real benchmarks."""

from __future__ import annotations


def message_sizes(min_bytes: int, max_bytes: int, step_factor: int) -> list[int]:
    """min_bytes, min_bytes * step_factor, ... up to max_bytes."""
    if min_bytes < 1 or step_factor < 2:
        raise ValueError("min_bytes must be >= 1 and step_factor >= 2")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= step_factor
    return sizes

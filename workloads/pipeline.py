"""Pipeline schedules (GPipe and 1F1B) over point-to-point sends between neighbouring stages.

Each micro-batch's activations go forward and their gradients come back
across every stage boundary. Where a stage sends one way and receives the
other way at the same moment (1F1B's steady state), both are issued as one
`batch_isend_irecv`, which NCCL needs to avoid a deadlock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import torch
import torch.distributed as dist

from dynamiccl.workloads.model import Stage


class Schedule(StrEnum):
    gpipe = "gpipe"
    one_f_one_b = "1f1b"


class PipelineStage:
    """One stage's side of the schedule: `run` returns the micro-batch losses (last stage only)."""

    def __init__(self, stage: Stage, stages_after: int, previous: tuple[int, Any] | None,
                 next: tuple[int, Any] | None, activation_shape: tuple[int, ...],
                 device: torch.device | str = "cpu") -> None:
        self.stage = stage
        self.stages_after = stages_after
        self.previous = previous
        self.next = next
        self.shape = activation_shape
        self.device = device

    def run(self, schedule: Schedule, tokens: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[float]:
        self._tokens, self._targets = tokens, targets
        self._losses: list[float] = []
        self._scale = 1.0 / len(tokens)
        if schedule is Schedule.gpipe:
            self._gpipe(len(tokens))
        else:
            self._one_f_one_b(len(tokens))
        return self._losses

    # --- the two schedules -------------------------------------------------------------------

    def _gpipe(self, micro: int) -> None:
        saved = []
        for m in range(micro):
            x = self._receive_forward(m)
            y = self._forward(m, x)
            self._send(y, self.next)
            saved.append((x, y))
        for x, y in saved:
            self._send(self._backward(x, y, self._receive(self.next)), self.previous)

    def _one_f_one_b(self, micro: int) -> None:
        """Megatron's non-interleaved 1F1B: warm up, alternate one forward and one backward, drain."""
        warmup = min(self.stages_after, micro)
        steady = micro - warmup
        pending: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        for m in range(warmup):
            x = self._receive_forward(m)
            y = self._forward(m, x)
            self._send(y, self.next)
            pending.append((x, y))
        x = self._receive_forward(warmup) if steady else None
        for i in range(steady):
            y = self._forward(warmup + i, x)
            pending.append((x, y))
            grad = self._exchange(y, self.next)
            x_done, y_done = pending.popleft()
            grad_in = self._backward(x_done, y_done, grad)
            if i == steady - 1:
                self._send(grad_in, self.previous)
            elif self.previous is None:
                x = self._tokens[warmup + i + 1]
            else:
                x = self._exchange(grad_in, self.previous)
        for _ in range(warmup):
            x_done, y_done = pending.popleft()
            self._send(self._backward(x_done, y_done, self._receive(self.next)), self.previous)

    # --- compute ----------------------------------------------------------------------------

    def _forward(self, m: int, x: torch.Tensor) -> torch.Tensor:
        if self.stage.last:
            loss = self.stage(x, self._targets[m])
            self._losses.append(float(loss.detach()))
            return loss * self._scale
        return self.stage(x)

    def _backward(self, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
        torch.autograd.backward(y, grad_tensors=None if self.stage.last else grad)
        return None if self.stage.first else x.grad

    # --- communication ----------------------------------------------------------------------

    def _receive_forward(self, m: int) -> torch.Tensor:
        if self.previous is None:
            return self._tokens[m]
        return self._receive(self.previous).requires_grad_()

    def _receive(self, peer: tuple[int, Any] | None) -> torch.Tensor | None:
        if peer is None:
            return None
        buffer = torch.empty(self.shape, device=self.device)
        dist.recv(buffer, src=peer[0], group=peer[1])
        return buffer

    def _send(self, tensor: torch.Tensor | None, peer: tuple[int, Any] | None) -> None:
        if peer is not None and tensor is not None:
            dist.send(tensor.detach().contiguous(), dst=peer[0], group=peer[1])

    def _exchange(self, tensor: torch.Tensor, peer: tuple[int, Any] | None) -> torch.Tensor | None:
        """Send `tensor` to `peer` and receive its tensor back, as one batched pair."""
        if peer is None:
            return None
        rank, group = peer
        buffer = torch.empty(self.shape, device=self.device)
        ops = [dist.P2POp(dist.isend, tensor.detach().contiguous(), rank, group),
               dist.P2POp(dist.irecv, buffer, rank, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if self.previous is not None and peer is self.previous:
            buffer.requires_grad_()
        return buffer

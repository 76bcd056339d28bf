"""The demo's figure: speedup per tuning round, and bus bandwidth by size, default vs tuned vs oracle."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from dynamiccl.nccl.cost_model import bus_bandwidth_gbs  # noqa: E402

if TYPE_CHECKING:
    from dynamiccl.workloads.demo import Outcome


def write_figure(outcomes: Sequence[Outcome], path: Path) -> None:
    figure, (rounds_axis, busbw_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    for outcome in outcomes:
        speedups = outcome.speedup_by_round
        rounds_axis.plot(range(1, len(speedups) + 1), speedups, marker=".",
                         label=f"{outcome.scenario.preset}: {outcome.scenario.name}")
    rounds_axis.axhline(1.0, color="grey", linewidth=0.8)
    rounds_axis.set(title="Step communication speedup over NCCL's default", xlabel="tuning round",
                    ylabel="default time / DynamICCL time")
    rounds_axis.legend(fontsize=7)

    sweep = next((o for o in outcomes if len(o.scenario.stages) == 1
                  and all(e.parallelism == "sweep" for e in o.scenario.stages[0])), None)
    if sweep is not None and sweep.tuned:
        contexts = [e.context for e in sweep.scenario.stages[0]]
        curves = {"NCCL default": sweep.default, "DynamICCL (tuner rules)": sweep.tuned, "oracle": sweep.oracle}
        for label, latency in curves.items():
            busbw_axis.plot([c.nbytes for c in contexts], [bus_bandwidth_gbs(c, latency[c]) for c in contexts],
                            marker=".", label=label, linestyle="--" if label == "oracle" else "-")
        first = contexts[0]
        busbw_axis.set(xscale="log", xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)",
                       title=f"{sweep.scenario.preset}: allreduce, {first.nranks} ranks on {first.nnodes} nodes")
        busbw_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

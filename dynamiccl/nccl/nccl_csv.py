"""The measurement CSV that NCCL's example tuner's `optimize_config.py` reads, as Measurements.

Columns (plugins/tuner/example/scripts/README.md): collective, size_bytes,
algorithm, protocol, channels, nodes, ranks, pipeOps, regBuff, and the metrics
cost_metric, bandwidth_gbps, latency_us. A measurement needs what a metric
alone cannot give: `latency_us`, and the communicator's `nodes` and `ranks`
(not `-1`). DynamICCL's contexts are calls of one op with unregistered buffers,
so rows for `pipeOps` > 1 or `regBuff` 1 are refused as another kind of call.
Every refused row is returned with its line number and the reason.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from pydantic import ValidationError

from dynamiccl.schemas import Context, Measurement, NcclConfig

REQUIRED = ("collective", "size_bytes", "algorithm", "protocol", "channels", "nodes", "ranks", "latency_us")


class NcclCsvFormatError(ValueError):
    """Not the CSV `optimize_config.py` reads; the message names what is missing."""


@dataclass(frozen=True)
class RefusedRow:
    line: int
    reason: str


def _int(row: dict[str, str], name: str, default: int = -1) -> int:
    text = (row.get(name) or "").strip()
    return default if text == "" else int(text)


def _row(row: dict[str, str], job_id: str | None) -> Measurement:
    nodes, ranks = _int(row, "nodes"), _int(row, "ranks")
    if nodes < 1 or ranks < 1:
        raise ValueError("nodes and ranks must be the communicator's (not -1) for a measurement")
    if _int(row, "pipeOps") not in (-1, 1) or _int(row, "regBuff") == 1:
        raise ValueError("a call of several pipelined ops or on registered buffers is another kind of call")
    channels = _int(row, "channels")
    return Measurement(
        context=Context(collective=row["collective"].strip(), nbytes=_int(row, "size_bytes"), nranks=ranks,
                        nnodes=nodes),
        config=NcclConfig(algo=row["algorithm"].strip(), proto=row["protocol"].strip(),
                          nchannels=None if channels == -1 else channels),
        latency_us=float(row["latency_us"]), source="bench", job_id=job_id,
    )


def parse_nccl_csv(text: str, job_id: str | None = None) -> tuple[list[Measurement], list[RefusedRow]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [name for name in REQUIRED if name not in (reader.fieldnames or [])]
    if missing:
        raise NcclCsvFormatError(f"missing column(s) {', '.join(missing)} (the header of optimize_config.py's "
                                 "input: collective,size_bytes,algorithm,protocol,channels,nodes,ranks,pipeOps,"
                                 "regBuff,cost_metric,bandwidth_gbps,latency_us)")
    measurements, refused = [], []
    for row in reader:
        try:
            measurements.append(_row(row, job_id))
        except ValidationError as error:
            first = error.errors()[0]
            refused.append(RefusedRow(reader.line_num, f"{'.'.join(map(str, first['loc']))}: {first['msg']}"))
        except (ValueError, AttributeError, TypeError) as error:
            refused.append(RefusedRow(reader.line_num, str(error)))
    return measurements, refused

"""Follows NCCL Inspector's dumps (NCCL_INSPECTOR_DUMP_DIR) and yields Measurements: its JSON
lines, and its Prometheus textfiles (`*.prom`, `NCCL_INSPECTOR_PROM_DUMP=1`; inspector_prom.py
says how those are read).

Which records count: every rank of a communicator writes its own record of
the same collective call. Only the records of rank 0 are used: each
communicator has exactly one rank 0, on exactly one node, so across the whole
cluster every call is counted once (de-duplicating by (communicator id,
coll_sn) on each node would still count it once per node, and would need
memory per call). For point-to-point operations the Send side is used, from
every rank: each transfer has exactly one sender, so it too is counted once.

The job a record belongs to: the job id the agent is configured with
(`AgentConfig.inspector_job_id`) when given, else that of the folder under the
dump dir the file is in (`dynamiccl launch` points each job's
NCCL_INSPECTOR_DUMP_DIR at `<dump dir>/<path-safe job id>` when it knows the
dump dir, from $DYNAMICCL_INSPECTOR_DIR, and writes the job id itself there:
`JOB_ID_FILE`), so Inspector's records and the hook's measurements of a job
carry one job id.

Records are read as NCCL's writer produces them (compact, one a line) and as
its README shows them (pretty-printed over several lines). Sizes follow API.md:
Inspector's allgather, reducescatter and alltoall sizes are per rank and are
multiplied by n_ranks. Only GPU-kernel-timed records (`kernel_gpu`) become
latencies; CPU-timed ones are counted (`cpu_timed`) and skipped.

Reading is resumable and safe against a writer in progress: a file is read up
to its last complete record (a partial one is read again next time).
Offsets belong to a file's identity (device and inode), not its name: a path
that now names a new file (rotation: inode changed) is read from the start,
the renamed old file keeps its offset (no record read twice), and a file that
shrank below its offset (truncated in place) is read again from the start.
A textfile is rewritten every interval: what was read of it is remembered
by length, digest and modification time, and only what is new is read (the
lines appended within an interval, or the whole file once it is rewritten).
The offsets live in a JSON state file replaced atomically, so an agent
restart resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from dynamiccl.agent.daemon.inspector_names import COLLECTIVES, PER_RANK_SIZES, nccl_name
from dynamiccl.agent.daemon.inspector_prom import is_textfile, parse_textfile
from dynamiccl.agent_api import JOB_ID_FILE
from dynamiccl.schemas import DEFAULT_CONFIG, Context, Measurement, NcclConfig

log = logging.getLogger("dynamiccl.agent.daemon.inspector")

MAX_READ_BYTES = 16 << 20  # per file and poll: bounds memory for a huge backlog
#: The only timing that measures the collective itself; CPU-side fallbacks are another quantity.
GPU_TIMING = "kernel_gpu"


class NotGpuTimed(ValueError):
    """A record timed on the CPU (`coll_timing_source` other than kernel_gpu)."""


def record_to_measurement(record: dict[str, Any], config: NcclConfig, job_id: str | None) -> Measurement | None:
    """One Inspector record as a Measurement, or None when it is not counted (see module docstring);
    NotGpuTimed for a record timed on the CPU."""
    header = record.get("header") or {}
    if "coll_perf" in record:
        perf = record["coll_perf"]
        collective = COLLECTIVES.get(nccl_name(perf.get("coll", "")))
        if collective is None or header.get("rank") != 0:
            return None
        nbytes, exec_us = perf.get("coll_msg_size_bytes"), perf.get("coll_exec_time_us")
        timing = perf.get("coll_timing_source", GPU_TIMING)
        if collective in PER_RANK_SIZES and isinstance(nbytes, int):
            nbytes *= header.get("n_ranks") if isinstance(header.get("n_ranks"), int) else 1
    elif "p2p_perf" in record:
        perf = record["p2p_perf"]
        if nccl_name(perf.get("p2p", "")) != "send":
            return None
        collective = "sendrecv"
        nbytes, exec_us = perf.get("p2p_msg_size_bytes"), perf.get("p2p_exec_time_us")
        timing = perf.get("p2p_timing_source", GPU_TIMING)
    else:
        return None
    if not isinstance(exec_us, int | float) or exec_us <= 0:
        return None  # no timing (the plugin writes 0 when it has none)
    if timing != GPU_TIMING:
        raise NotGpuTimed(f"timed by {timing}")
    dump_us = (record.get("metadata") or {}).get("dump_timestamp_us")
    return Measurement(
        context=Context(
            collective=collective,
            nbytes=nbytes,
            nranks=header.get("n_ranks"),
            nnodes=header.get("nnodes") or 1,
        ),
        config=config,
        latency_us=float(exec_us),
        count=1,
        source="inspector",
        job_id=job_id,
        ts=dump_us / 1e6 if isinstance(dump_us, int | float) else None,
    )


_DECODER = json.JSONDecoder()


#: Per job, what is new in its textfiles: (text, modification time), parsed together.
Textfiles = dict[str | None, list[tuple[str, float]]]


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _identity(f: BinaryIO, seen: set[str]) -> tuple[str, os.stat_result]:
    """An open file's key in the offsets (device and inode: the file, not its name), noted as seen."""
    stat = os.fstat(f.fileno())
    key = f"{stat.st_dev}:{stat.st_ino}"
    seen.add(key)
    return key, stat


def records(text: str) -> tuple[list[Any], int, int]:
    """The JSON values in `text`, written one a line (NCCL's writer) or pretty-printed over several
    (the README's examples): (values, characters consumed, malformed stretches skipped). An
    incomplete value at the end is left unconsumed, to be read whole next time."""
    values, position, skipped = [], 0, 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return values, position, skipped
        try:
            value, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as error:
            newline = text.find("\n", error.pos)
            if error.pos >= len(text) - 1 or newline < 0:
                return values, position, skipped  # still being written
            skipped += 1
            position = text.find("\n", position) + 1 or newline + 1
            continue
        values.append(value)
        position = end


class InspectorReader:
    """Reads new complete records from every file under `dump_dir`; see the module docstring."""

    def __init__(
        self,
        dump_dir: Path,
        state_file: Path,
        config: NcclConfig = DEFAULT_CONFIG,
        job_id: str | None = None,
    ) -> None:
        self.dump_dir = dump_dir
        self.state_file = state_file
        self.config = config
        self.job_id = job_id
        self._folder_jobs: dict[str, str] = {}  # dump folder name -> its job id
        self.skipped = 0  # malformed or invalid records
        self.cpu_timed = 0  # records timed on the CPU: counted, not used as latencies
        self.other_config = 0  # textfile buckets NCCL ran with another pair than the job forced
        # Keyed by file identity (device:inode), not path: a file rotated by renaming keeps its
        # offset, so its records are not read twice; a path that now names a new file starts at 0.
        self._offsets: dict[str, dict[str, int | str]] = self._load_state()

    def _load_state(self) -> dict[str, dict[str, int | str]]:
        try:
            state = json.loads(self.state_file.read_text())
            return {str(k): {"path": str(v["path"]), "offset": int(v["offset"]),
                             **({"digest": str(v["digest"]), "mtime": int(v["mtime"])} if "digest" in v else {})}
                    for k, v in state.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("inspector state %s unreadable; reading dumps from the start", self.state_file)
            return {}

    def _save_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=".inspector-state-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._offsets, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _files(self) -> list[Path]:
        if not self.dump_dir.is_dir():
            return []
        state = self.state_file.resolve()
        return sorted(
            p for p in self.dump_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.resolve() != state
        )

    def poll(self) -> list[Measurement]:
        """New measurements since the last poll; the offsets are saved before returning."""
        out: list[Measurement] = []
        textfiles: Textfiles = defaultdict(list)
        seen: set[str] = set()
        changed = False
        for path in self._files():
            try:
                if is_textfile(path.name):
                    changed |= self._read_textfile(path, seen, textfiles)
                else:
                    changed |= self._read(path, seen, out)
            except OSError as error:  # vanished or unreadable meanwhile: try again next poll
                log.debug("skipping %s: %s", path, error)
        for job_id, texts in textfiles.items():  # a job's GPUs together: one sample per communicator
            self._parse_textfiles(texts, job_id, out)
        for gone in set(self._offsets) - seen:  # deleted files
            del self._offsets[gone]
            changed = True
        if changed:
            self._save_state()
        return out

    def _read(self, path: Path, seen: set[str], out: list[Measurement]) -> bool:
        with path.open("rb") as f:
            key, stat = _identity(f, seen)
            saved = self._offsets.get(key)
            offset = int(saved["offset"]) if saved else 0
            if stat.st_size < offset:  # truncated in place
                offset = 0
            if saved == {"path": str(path), "offset": offset} and stat.st_size == offset:
                return False
            f.seek(offset)
            chunk = f.read(MAX_READ_BYTES)
        text = chunk.decode("utf-8", errors="surrogateescape")  # round-trips every byte
        values, consumed, skipped = records(text)
        self.skipped += skipped
        end = len(text[:consumed].encode("utf-8", errors="surrogateescape"))
        if end == 0 and len(chunk) == MAX_READ_BYTES:  # one record longer than any: skip it
            self.skipped += 1
            end = len(chunk)
        job_id = self.job_id or self._job_of(path)
        for value in values:
            self._parse(value, out, job_id)
        self._offsets[key] = {"path": str(path), "offset": offset + end}
        return True

    def _read_textfile(self, path: Path, seen: set[str], textfiles: Textfiles) -> bool:
        """What is new in a Prometheus textfile (see the module docstring), queued for parsing."""
        with path.open("rb") as f:
            key, stat = _identity(f, seen)
            complete = f.read(MAX_READ_BYTES)
        complete = complete[:complete.rfind(b"\n") + 1]  # a line being written is read next time
        saved = self._offsets.get(key)
        state = {"path": str(path), "offset": len(complete), "digest": _digest(complete), "mtime": stat.st_mtime_ns}
        if saved == state:
            return False
        offset = int(saved["offset"]) if saved else 0
        appended = (saved is not None and offset <= len(complete)
                    and saved.get("digest") == _digest(complete[:offset])
                    and (offset < len(complete) or saved.get("mtime") == stat.st_mtime_ns))
        new = complete[offset:] if appended else complete
        if new:
            textfiles[self.job_id or self._job_of(path)].append((new.decode("utf-8", errors="replace"), stat.st_mtime))
        self._offsets[key] = state
        return True

    def _parse_textfiles(self, texts: list[tuple[str, float]], job_id: str | None, out: list[Measurement]) -> None:
        try:
            read = parse_textfile("".join(text for text, _ in texts), self.config, job_id,
                                  max(mtime for _, mtime in texts))
        except ValueError as error:  # not Prometheus text at all
            self.skipped += 1
            log.debug("skipping an inspector textfile: %s", error)
            return
        self.skipped += read.malformed
        self.other_config += read.other_config
        out.extend(read.measurements)

    def _job_of(self, path: Path) -> str | None:
        """A job's own dump folder, `<dump_dir>/<job>/...` (what `dynamiccl launch` sets up), names
        its job: the id the launch wrote into it (JOB_ID_FILE), else the folder's name; a file
        directly in the dump dir belongs to no known job."""
        parts = path.relative_to(self.dump_dir).parts
        if len(parts) < 2:
            return None
        job = self._folder_jobs.get(parts[0])
        if job is None:
            try:
                job = (self.dump_dir / parts[0] / JOB_ID_FILE).read_text(encoding="utf-8").strip()[:128]
            except (OSError, UnicodeDecodeError):
                job = ""
            job = self._folder_jobs[parts[0]] = job or parts[0][:128]
        return job

    def _parse(self, record: Any, out: list[Measurement], job_id: str | None) -> None:
        try:
            if not isinstance(record, dict):
                raise ValueError("not an object")
            measurement = record_to_measurement(record, self.config, job_id)
        except NotGpuTimed:
            self.cpu_timed += 1
            return
        except (ValueError, ValidationError, TypeError, AttributeError) as error:
            self.skipped += 1
            log.debug("skipping an inspector record: %s", error)
            return
        if measurement is not None:
            out.append(measurement)


class InspectorFollower:
    """Polls an InspectorReader on a thread and hands what it reads to `sink`."""

    def __init__(
        self, reader: InspectorReader, sink: Callable[[list[Measurement]], object], interval_s: float = 1.0
    ) -> None:
        self.reader = reader
        self.sink = sink
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynamiccl-inspector", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                measurements = self.reader.poll()
                if measurements:
                    self.sink(measurements)
            except Exception:  # never let a bad dump stop the follower
                log.exception("reading inspector dumps failed")

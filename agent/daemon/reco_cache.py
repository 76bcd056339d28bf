"""On-disk cache of each job's pinned recommendation, for when the server is away.

One JSON file per (fabric, job), replaced atomically. Only the answer the
server pinned for that very job is ever served from here: serving another
job's answer, or a guess, could make nodes of one job disagree (NCCL hangs).
The number of files is bounded; the least recently written go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from dynamiccl.schemas import RecommendResponse

DEFAULT_MAX_JOBS = 10_000


class RecommendationCache:
    def __init__(self, directory: Path, max_jobs: int = DEFAULT_MAX_JOBS) -> None:
        self.directory = directory
        self.max_jobs = max_jobs
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, fabric_id: str, job_id: str) -> Path:
        digest = hashlib.sha256(json.dumps([fabric_id, job_id]).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def get(self, fabric_id: str, job_id: str) -> RecommendResponse | None:
        try:
            entry = json.loads(self._path(fabric_id, job_id).read_text())
            if entry.get("fabric_id") != fabric_id or entry.get("job_id") != job_id:
                return None
            return RecommendResponse.model_validate(entry["answer"])
        except (OSError, ValueError, KeyError, AttributeError):
            return None

    def put(self, fabric_id: str, job_id: str, answer: RecommendResponse) -> None:
        entry = {"fabric_id": fabric_id, "job_id": job_id, "answer": answer.model_dump(mode="json")}
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(fabric_id, job_id))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._evict()

    def _evict(self) -> None:
        files = list(self.directory.glob("*.json"))
        if len(files) <= self.max_jobs:
            return
        aged = []
        for path in files:
            try:
                aged.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # evicted by a concurrent put
                continue
        aged.sort()
        for _, path in aged[: len(aged) - self.max_jobs]:
            path.unlink(missing_ok=True)

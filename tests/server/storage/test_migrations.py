"""Schema migrations when several server replicas start on one empty database at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

# Each replica process waits for the same instant, then opens the store (which migrates).
OPEN_AT = """
import sys, time
from dynamiccl.server.storage.sql import SqlStore
url, at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
SqlStore(url).close()
"""


@pytest.mark.postgres
def test_replicas_starting_together_on_an_empty_database_all_come_up(postgres_schema_url: str) -> None:
    at = time.time() + 5.0  # after every interpreter has imported SQLAlchemy and alembic
    replicas = [subprocess.Popen([sys.executable, "-c", OPEN_AT, postgres_schema_url, str(at)],
                                 stderr=subprocess.PIPE, text=True) for _ in range(3)]
    failures = []
    for replica in replicas:
        _, stderr = replica.communicate(timeout=60)
        if replica.returncode:
            failures.append(stderr[-600:])
    assert failures == []

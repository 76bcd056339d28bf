"""Fixtures of the deployment tests: the Prometheus binaries, and processes shared by a module's
tests (the per-test `processes` fixture is every suite's, in tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from processes import Processes


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """The directory holding `prometheus` and `promtool` (scripts/prometheus.sh installs them);
    missing is a failure unless DYNAMICCL_SKIP_PROMETHEUS=1."""
    found = shutil.which("promtool"), shutil.which("prometheus")
    if None in found:
        message = ("prometheus and promtool are not on PATH: run scripts/prometheus.sh, "
                   "or set DYNAMICCL_SKIP_PROMETHEUS=1 to skip the tests that need them.")
        if os.environ.get("DYNAMICCL_SKIP_PROMETHEUS") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return Path(found[0]).parent


@pytest.fixture(scope="module")
def module_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """Processes shared by the tests of one module (a stack set up once)."""
    procs = Processes(tmp_path_factory.mktemp("processes"))
    yield procs
    procs.close()

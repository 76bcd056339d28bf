"""Waiting for what another thread or process does: the one polling loop of every suite
(`pythonpath` in pyproject.toml puts this folder on the path, so test modules import it, as
they import `processes`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.05) -> None:
    """Poll `condition` until it is true. An HTTP error counts as "not yet" (a server still
    starting, or away for a moment); after `timeout` seconds, an AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met within {timeout:g} s")
        time.sleep(interval)

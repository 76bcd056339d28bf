"""Storage: the `Store` interface and its SQLAlchemy implementation."""

import math
import os

from dynamiccl.server.storage.base import CompactedCount, Store, StoredMeasurement
from dynamiccl.server.storage.sql import DEFAULT_MAX_PINS, DEFAULT_PIN_TTL_S, SqlStore


def open_store(url: str) -> Store:
    """A store for a database URL: `sqlite:///path.db` or `postgresql+psycopg://...`; pins expire
    after $DYNAMICCL_PIN_TTL_S seconds (default 7 days), at most $DYNAMICCL_MAX_PINS are kept."""
    return SqlStore(url, pin_ttl_s=env_number("DYNAMICCL_PIN_TTL_S", DEFAULT_PIN_TTL_S),
                    max_pins=int(env_number("DYNAMICCL_MAX_PINS", DEFAULT_MAX_PINS)))


def env_number(name: str, default: float) -> float:
    """A positive number from the environment variable `name`, `default` when unset; a clear error
    naming the variable otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${name}={text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"${name} must be a positive number, got {text}")
    return value


__all__ = ["CompactedCount", "SqlStore", "Store", "StoredMeasurement", "env_number", "open_store"]

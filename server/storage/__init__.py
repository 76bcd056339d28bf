"""Storage: the `Store` interface and its SQLAlchemy implementation."""

from dynamiccl.server.storage.base import Store, StoredMeasurement
from dynamiccl.server.storage.sql import SqlStore


def open_store(url: str) -> Store:
    """A store for a database URL: `sqlite:///path.db` or `postgresql+psycopg://...`."""
    return SqlStore(url)


__all__ = ["SqlStore", "Store", "StoredMeasurement", "open_store"]

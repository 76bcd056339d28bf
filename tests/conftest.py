"""Fixtures shared by the suites: stores on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text

from dynamiccl.schemas import Fabric
from dynamiccl.server.storage import SqlStore

POSTGRES_URL = os.environ.get(
    "DYNAMICCL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/dynamiccl_test"
)


def _fresh_postgres() -> str:
    """An empty public schema in the test database (scripts/postgres.sh provides the server)."""
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    except Exception as error:  # a missing server is a failure, not a skip: run scripts/postgres.sh
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is unusable ({error}); run scripts/postgres.sh")
    finally:
        engine.dispose()
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/dynamiccl.db"
    return _fresh_postgres()


@pytest.fixture
def store(database_url):
    store = SqlStore(database_url)
    yield store
    store.close()


@pytest.fixture
def h100() -> Fabric:
    return Fabric(gpu="H100-SXM", gpus_per_node=8, intra_node="nvswitch", inter_node="ib-ndr400",
                  nics_per_node=8, nccl_version="2.28.9")


@pytest.fixture
def sqlite_store(tmp_path):
    store = SqlStore(f"sqlite:///{tmp_path}/dynamiccl.db")
    yield store
    store.close()

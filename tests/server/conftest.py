"""Fixtures of the server tests: a database per test (SQLite file or PostgreSQL schema), stores,
apps with a scripted tuner, and the example bodies of shared/design/API.md."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from dynamiccl.nccl.space import candidate_configs
from dynamiccl.schemas import Context, Fabric, Measurement, NcclConfig, SuggestionKind
from dynamiccl.server.app import create_app
from dynamiccl.server.learner import Decision, Estimate, Pick, Tuner
from dynamiccl.server.storage import SqlStore

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
POSTGRES_URL = os.environ.get(
    "DYNAMICCL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/dynamiccl_test"
)

class Examples:
    """The example bodies of shared/design/API.md and builders of valid variants of them
    (a fixture, since test modules cannot import conftest)."""

    FABRIC = {"gpu": "H100-SXM", "gpus_per_node": 8, "intra_node": "nvswitch",
              "inter_node": "ib-ndr400", "nics_per_node": 8, "nccl_version": "2.28.9"}
    CONTEXT = {"collective": "allreduce", "nbytes": 67108864, "nranks": 16, "nnodes": 2}
    CONFIG = {"algo": "ring", "proto": "ll128", "nchannels": 16}
    MEASUREMENT = {"context": CONTEXT, "config": CONFIG, "latency_us": 812.5, "count": 20,
                   "source": "inspector", "job_id": "llama8b-0412", "ts": 1764000000.0,
                   "suggestion_id": "s-91f2"}
    FABRIC_ID = "dgx-h100-a"

    @classmethod
    def measurement(cls, nbytes: int = 1 << 20, latency_us: float = 100.0, **config: object) -> dict:
        """A valid measurement body for FABRIC (config defaults to ring/ll128/16)."""
        return {**cls.MEASUREMENT, "context": {**cls.CONTEXT, "nbytes": nbytes},
                "latency_us": latency_us, "config": config or cls.CONFIG}

    @classmethod
    def batch(cls, batch_id: str = "agent7-000123", n: int = 3, fabric_id: str = FABRIC_ID) -> dict:
        return {"fabric_id": fabric_id, "batch_id": batch_id,
                "measurements": [cls.measurement(nbytes=1024 << i) for i in range(n)]}

    @classmethod
    def suggest(cls, **extra: object) -> dict:
        return {"fabric_id": cls.FABRIC_ID, "contexts": [cls.CONTEXT], **extra}

    @classmethod
    def recommend(cls, **extra: object) -> dict:
        return {"fabric_id": cls.FABRIC_ID, "contexts": [{**cls.CONTEXT, "weight": 120.0}], **extra}

    @classmethod
    def measurements(cls, n: int, nbytes: int = 1 << 20) -> list[Measurement]:
        """n valid Measurement models, each of a distinct context."""
        return [Measurement.model_validate(cls.measurement(nbytes=nbytes + i, latency_us=10.0 + i))
                for i in range(n)]


@pytest.fixture
def examples() -> type[Examples]:
    return Examples


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test server's URL, checked once: unreachable is a failure unless DYNAMICCL_SKIP_POSTGRES=1."""
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except sa.exc.OperationalError as error:
        message = (f"PostgreSQL is not reachable at {POSTGRES_URL} ({error.orig}). "
                   "Run scripts/postgres.sh, set DYNAMICCL_TEST_POSTGRES_URL, "
                   "or set DYNAMICCL_SKIP_POSTGRES=1 to skip the PostgreSQL tests.")
        if os.environ.get("DYNAMICCL_SKIP_POSTGRES") == "1":
            pytest.skip(message)
        pytest.fail(message, pytrace=False)
    return POSTGRES_URL


@pytest.fixture
def postgres_schema_url(postgres_url: str) -> Iterator[str]:
    """A URL whose connections work in a fresh schema of their own, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield sa.make_url(postgres_url).update_query_dict(
            {"options": f"-csearch_path={schema}"}
        ).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dynamiccl.db'}"
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    store = SqlStore(database_url)
    yield store
    store.close()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'api.db'}"


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[SqlStore]:
    """A file-backed SQLite store (an in-memory one would differ per thread: the learner's
    refits run on a thread of their own)."""
    store = SqlStore(sqlite_url)
    yield store
    store.close()


class ScriptedTuner(Tuner):
    """A stand-in for the learner: picks valid configs from the seed, records what it observes,
    and decides for the last candidate of each context, measured `speedup` times faster."""

    def __init__(self, speedup: float = 1.25, seed_offset: int = 0) -> None:
        self.seed_offset = seed_offset
        self.observed: list[tuple[str, int]] = []
        self.seeds: list[int] = []
        self.fail_observe = False
        self.speedup = speedup

    def observe(self, fabric_id: str, fabric: Fabric, measurements: Sequence[Measurement]) -> None:
        if self.fail_observe:
            raise RuntimeError("learner broke")
        self.observed.append((fabric_id, len(measurements)))

    def suggest(self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context], seed: int) -> list[Pick]:
        self.seeds.append(seed)
        rng = random.Random(seed + self.seed_offset)
        picks = []
        for context in contexts:
            config = rng.choice(candidate_configs(fabric, context))
            picks.append(Pick(config, SuggestionKind.default if config.is_default else SuggestionKind.explore))
        return picks

    def recommend(self, fabric_id: str, fabric: Fabric, contexts: Sequence[Context]) -> list[Decision]:
        decisions = []
        for context in contexts:
            candidates = (NcclConfig(), candidate_configs(fabric, context)[-1])
            evidence = (Estimate(math.log(100.0), 0.01, 5), Estimate(math.log(100.0 / self.speedup), 0.01, 5))
            decisions.append(Decision(context, candidates, evidence, 1, confidence=0.9))
        return decisions


@pytest.fixture
def tuner_class() -> type[ScriptedTuner]:
    return ScriptedTuner


@pytest.fixture
def tuner() -> ScriptedTuner:
    return ScriptedTuner()


@pytest.fixture
def client(sqlite_url: str, tuner: ScriptedTuner) -> Iterator[TestClient]:
    """An open (no tokens) API over a fresh SQLite database, with fabric `dgx-h100-a` created.
    Server exceptions propagate, so a test that provokes a 500 fails loudly."""
    with TestClient(create_app(store=SqlStore(sqlite_url), tuner=tuner, tokens={})) as client:
        assert client.put("/v1/fabrics/dgx-h100-a", json=Examples.FABRIC).status_code == 201
        yield client


@pytest.fixture(scope="session")
def reliability() -> Iterator[ModuleType]:
    """benchmarks/reliability.py (the poisoning experiment, the soak, a killable server process)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("reliability", BENCHMARKS / "reliability.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["reliability"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("reliability", None)
        sys.path.remove(str(BENCHMARKS))

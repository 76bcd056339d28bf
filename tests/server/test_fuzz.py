"""Fuzzing from the server's own OpenAPI schema: valid and invalid requests to every operation
never give a 500, every answer matches the schema (status codes, content type, body), invalid
input is refused, and a refused request changes nothing stored."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
import sqlalchemy as sa
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from dynamiccl.schemas import Fabric
from dynamiccl.server.app import create_app
from dynamiccl.server.storage import SqlStore
from dynamiccl.server.storage.tables import metadata

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture
def fuzz_app(tmp_path, examples) -> Iterator[FastAPI]:
    """The real server (learner included) over SQLite, with a fabric and a few measurements."""
    store = SqlStore(f"sqlite:///{tmp_path / 'fuzz.db'}")
    store.put_fabric(examples.FABRIC_ID, Fabric.model_validate(examples.FABRIC))
    store.add_batch(examples.FABRIC_ID, "seed", examples.measurements(5), "seed-agent")
    app = create_app(store=store, tokens={})
    yield app
    app.state.tuner.close()
    store.close()


def snapshot(app: FastAPI) -> dict[str, list[tuple]]:
    """Every row of every table."""
    engine: sa.Engine = app.state.store.engine
    with engine.connect() as conn:
        return {table.name: sorted(map(tuple, conn.execute(sa.select(table)).all()), key=repr)
                for table in metadata.sorted_tables}


OPERATIONS = [("PUT", "/v1/fabrics/{fabric_id}"), ("GET", "/v1/fabrics/{fabric_id}"),
              ("POST", "/v1/measurements"), ("POST", "/v1/suggest"), ("POST", "/v1/recommend")]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_the_api_holds_its_schema_and_refusals_change_nothing(fuzz_app, method, path, mode):
    operation = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        before = snapshot(fuzz_app)
        response = case.call()
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert snapshot(fuzz_app) == before, f"{method} {path} -> {response.status_code} changed the store"

    fuzz()

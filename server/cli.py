"""`dynamiccl server`: run the tuning server with uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from dynamiccl.server.app import create_app, database_url_from_env, masked
from dynamiccl.server.auth import load_tokens
from dynamiccl.server.errors import RateLimit
from dynamiccl.server.storage import open_store


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    database: str | None = None,
    tokens_file: Path | None = None,
    rate_limit: RateLimit | None = None,
) -> None:
    """`rate_limit` None reads DYNAMICCL_RATE_LIMIT / DYNAMICCL_RATE_BURST (unset: no limit)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = database or database_url_from_env()
    log = logging.getLogger("dynamiccl.server")
    log.info("database: %s", masked(url))
    log.info("listening on http://%s:%d", host, port)
    app = create_app(store=open_store(url), tokens=load_tokens(tokens_file), rate_limit=rate_limit)
    uvicorn.run(app, host=host, port=port, log_level="info")

"""`dynamiccl server`: run the tuning server with uvicorn, in one process or several."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import uvicorn

from dynamiccl.server.app import DATABASE_ENV, create_app, database_url_from_env, masked
from dynamiccl.server.auth import TOKENS_FILE_ENV, load_tokens
from dynamiccl.server.storage import open_store


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    database: str | None = None,
    tokens_file: Path | None = None,
    workers: int = 1,
) -> None:
    """Serve on host:port. With `workers` > 1 uvicorn starts that many processes on one socket,
    each building the app from the environment (`create_app()`): every worker has its own
    learner, kept consistent with the others through the shared database, as replicas are."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = database or database_url_from_env()
    log = logging.getLogger("dynamiccl.server")
    log.info("database: %s", masked(url))
    log.info("listening on http://%s:%d (%d worker process%s)", host, port, workers, "" if workers == 1 else "es")
    if workers == 1:
        app = create_app(store=open_store(url), tokens=load_tokens(tokens_file))
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    os.environ[DATABASE_ENV] = url
    if tokens_file is not None:
        os.environ[TOKENS_FILE_ENV] = str(tokens_file)
    uvicorn.run("dynamiccl.server.app:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="info")

"""`dynamiccl agent`: detect the fabric and run the node agent with uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import uvicorn

from dynamiccl.schemas import FABRIC_ID_RE

from dynamiccl.agent.app import create_app
from dynamiccl.agent.daemon import Agent, AgentConfig
from dynamiccl.agent.fabric_detect import FabricOverrides, default_fabric_id, detect_fabric

DEFAULT_LISTEN = "127.0.0.1:7461"

log = logging.getLogger("dynamiccl.agent")


def default_spool_dir() -> Path:
    return Path(os.environ.get("DYNAMICCL_SPOOL") or Path.home() / ".cache" / "dynamiccl" / "agent")


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:7461') -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen must be host:port, got {listen!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def run_agent(
    server: str,
    listen: str = DEFAULT_LISTEN,
    spool: Path | None = None,
    fabric_id: str | None = None,
    token: str | None = None,
    window_s: float = 10.0,
    inspector_dir: Path | None = None,
    overrides: FabricOverrides = FabricOverrides(),
    max_backoff_s: float = 30.0,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = parse_listen(listen)
    detected = detect_fabric(overrides)
    for note in detected.notes:
        log.info("fabric: %s", note)
    fabric_id = fabric_id or default_fabric_id(detected.fabric)
    if not FABRIC_ID_RE.match(fabric_id):
        raise ValueError(f"--fabric-id must be 1 to 128 of [A-Za-z0-9._:-], got {fabric_id!r}")
    log.info("fabric %s: %s", fabric_id, detected.fabric.model_dump_json())
    config = AgentConfig(
        server=server,
        fabric_id=fabric_id,
        fabric=detected.fabric,
        spool_dir=spool or default_spool_dir(),
        token=token,
        window_s=window_s,
        inspector_dir=inspector_dir,
        max_backoff_s=max_backoff_s,
    )
    log.info("local API on http://%s:%d", host, port)
    uvicorn.run(create_app(Agent(config)), host=host, port=port, log_level="warning")

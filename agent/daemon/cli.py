"""`dynamiccl agent`: detect the fabric and run the node agent with uvicorn.

The local API takes measurements and rules-file registrations in the node's name, so it is
served only where the node's jobs alone reach it: a Unix domain socket in a directory shared
with them (`unix:/run/dynamiccl/agent.sock`), or loopback. Prometheus scrapes `/metrics` on a
listener of its own (`metrics_listen`), which serves nothing else.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from prometheus_client import start_http_server

from dynamiccl.agent.daemon.agent import Agent, AgentConfig
from dynamiccl.agent.daemon.app import create_app
from dynamiccl.agent.daemon.fabric_detect import FabricOverrides, default_fabric_id, detect_fabric
from dynamiccl.agent_api import UNIX_SCHEME, unix_socket_path
from dynamiccl.schemas import FABRIC_ID_RE

DEFAULT_LISTEN = "127.0.0.1:7461"

log = logging.getLogger("dynamiccl.agent")


def default_spool_dir() -> Path:
    return Path(os.environ.get("DYNAMICCL_SPOOL") or Path.home() / ".cache" / "dynamiccl" / "agent")


@dataclass(frozen=True)
class Address:
    """Where a listener binds: a TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    socket: Path | None = None

    def __str__(self) -> str:
        return f"{UNIX_SCHEME}{self.socket}" if self.socket else f"http://{self.host}:{self.port}"


def parse_address(text: str, option: str = "--listen") -> Address:
    """'host:port' (IPv6 as '[::1]:7461') or 'unix:/path/agent.sock'."""
    socket_path = unix_socket_path(text)
    if socket_path is not None:
        return Address(socket=Path(socket_path))
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{option} must be host:port or unix:/path/agent.sock, got {text!r}")
    return Address(host=host.strip("[]") or "127.0.0.1", port=int(port))


def local_api_address(text: str) -> Address:
    """The local API's address; refused unless only this node's processes can reach it."""
    address = parse_address(text)
    if address.socket is None and not _is_loopback(address.host):
        raise ValueError(
            f"--listen {text}: the local API takes measurements and rules files in this node's name, so it "
            "serves only this node: a Unix socket shared with its jobs (unix:/run/dynamiccl/agent.sock) or "
            "a loopback address; give Prometheus --metrics-listen HOST:PORT")
    return address


def read_token(path: Path) -> str:
    """The agent's own bearer token, from a file (a Kubernetes Secret key mounted per node)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ValueError(f"--token-file {path}: {error.strerror}; issue this node a token with "
                         "`dynamiccl tokens issue`") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"--token-file {path} does not hold one token")
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_socket(path: Path) -> None:
    """Make room for the agent's socket: its directory exists, and a socket left by an agent that
    died is removed (a live agent on it is refused, as a second TCP listener would be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()
                return
        raise ValueError(f"another agent is serving {path}")


def run_agent(
    server: str,
    listen: str = DEFAULT_LISTEN,
    spool: Path | None = None,
    fabric_id: str | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    window_s: float = 10.0,
    inspector_dir: Path | None = None,
    overrides: FabricOverrides = FabricOverrides(),
    max_backoff_s: float = 30.0,
    metrics_listen: str | None = None,
    rules_dir: Path | None = None,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address = local_api_address(listen)
    if token_file is not None:
        token = read_token(token_file)
    metrics_address = parse_address(metrics_listen, "--metrics-listen") if metrics_listen else None
    if metrics_address is not None and metrics_address.socket is not None:
        raise ValueError("--metrics-listen is for Prometheus: host:port")
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
        rules_dir=rules_dir,
    )
    agent = Agent(config)
    if metrics_address is not None:
        start_http_server(metrics_address.port, metrics_address.host, registry=agent.metrics.registry)
        log.info("metrics for Prometheus on %s/metrics", metrics_address)
    log.info("local API on %s", address)
    if address.socket is not None:
        _bind_socket(address.socket)
        uvicorn.run(create_app(agent), uds=str(address.socket), log_level="warning")
    else:
        uvicorn.run(create_app(agent), host=address.host, port=address.port, log_level="warning")

"""Registers the node's fabric with the server (PUT /v1/fabrics/{id}) in the background.

The agent must start and accept data while the server is down, so
registration is retried with backoff on a thread instead of blocking start-up.
`request()` asks for a new registration (the sender calls it when the server
answers 404 for the fabric, e.g. after its database was reset).
"""

from __future__ import annotations

import logging
import threading

import httpx

from dynamiccl.agent.daemon.sender import backoff_delay
from dynamiccl.client import ApiError, DynamicclClient
from dynamiccl.schemas import Fabric

log = logging.getLogger("dynamiccl.agent.daemon.registrar")


class Registrar:
    def __init__(
        self,
        client: DynamicclClient,
        fabric_id: str,
        fabric: Fabric,
        base_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.client = client
        self.fabric_id = fabric_id
        self.fabric = fabric
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.registered = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynamiccl-registrar", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def request(self) -> None:
        self.registered.clear()
        self._wake.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if self.registered.is_set():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self.client.put_fabric(self.fabric_id, self.fabric)
            except (ApiError, httpx.HTTPError, ValueError) as error:
                failures += 1
                log.warning("registering fabric %s failed (will retry): %s", self.fabric_id, error)
                self._wake.wait(backoff_delay(failures, self.base_backoff, self.max_backoff))
                self._wake.clear()
                continue
            failures = 0
            self.registered.set()
            log.info("fabric %s registered with the server", self.fabric_id)

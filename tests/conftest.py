"""Fixtures every suite may use."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from processes import Processes


class RecordingHttpServer:
    """A real HTTP server on loopback that records each POST (path, JSON body) and GET (path, {})
    and answers with `answer(path, body) -> (status, JSON body)`: a stand-in agent or server for
    subprocesses."""

    def __init__(self, answer: Callable[[str, dict], tuple[int, dict]]) -> None:
        self.requests: list[tuple[str, dict]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer({})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(json.loads(raw) if raw else {})

            def _answer(self, body: dict) -> None:
                requests.append((self.path, body))
                status, reply = answer(self.path, body)
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def posted(self, path: str) -> list[dict]:
        return [body for p, body in self.requests if p == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def recording_server() -> Iterator[Callable[[Callable[[str, dict], tuple[int, dict]]], RecordingHttpServer]]:
    """Starts RecordingHttpServers for a test module; all are closed at its end."""
    servers: list[RecordingHttpServer] = []

    def start(answer: Callable[[str, dict], tuple[int, dict]]) -> RecordingHttpServer:
        servers.append(RecordingHttpServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    """DynamICCL servers, agents and other child processes of the test, stopped after it."""
    procs = Processes(tmp_path)
    yield procs
    procs.close()

"""The daemon's HTTP listener on ``daemon.listen`` (127.0.0.1 by default): ``/healthz`` (the
health report as JSON; 200 when ok or degraded, 503 when unhealthy) and ``/metrics``
(Prometheus text format). Standard library server in a thread of its own, so a slow scrape
never touches the scheduling loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = structlog.get_logger(__name__)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); raises ValueError naming the value."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"listen address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:9580")
    return host.strip("[]"), int(port)


class Listener:
    """Serves /healthz and /metrics until :meth:`close`."""

    def __init__(self, address: str, health: Callable[[], dict[str, Any]]) -> None:
        host, port = parse_listen(address)
        handler = _handler(health)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="http-listener", daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self.thread.start()
        log.info("http.listening", address=self.address)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(health: Callable[[], dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                try:
                    rep = health()
                    code = 503 if rep["status"] == "unhealthy" else 200
                except Exception as exc:  # noqa: BLE001 - report, never crash the listener
                    rep, code = {"status": "unhealthy", "error": str(exc)}, 503
                self._send(code, "application/json", json.dumps(rep).encode())
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest())
            else:
                self._send(404, "text/plain", b"not found: try /healthz or /metrics\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return  # scrapes are not worth a journal line each

    return Handler

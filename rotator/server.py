"""/healthz, /readyz and /metrics on one small HTTP port, served by the service itself."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rotator.config_fields import host_port
from rotator.errors import ConfigError
from rotator.metrics import Metrics


@dataclass
class Readiness:
    """What /readyz reports; the service updates it."""

    config_loaded: bool = True
    iam_reachable: bool = False
    leader: bool | None = None  # None until the service first tried to lead
    iam_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.config_loaded and self.iam_reachable


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class HealthServer:
    def __init__(self, listen: str, metrics: Metrics, readiness: Readiness) -> None:
        """Bind ``listen`` (``service.listen``) at once; a ``ConfigError`` naming it when that fails (the
        port is taken, not permitted, or the address is not this host's)."""
        host, port = host_port(listen)
        self.metrics, self.readiness = metrics, readiness
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass  # scrapes every few seconds would drown the rotation events

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif path == "/readyz":
                    state = outer.readiness
                    body = json.dumps({"ready": state.ready, "config_loaded": state.config_loaded,
                                       "iam_reachable": state.iam_reachable, "iam_error": state.iam_error,
                                       "leader": state.leader}).encode()
                    self._send(200 if state.ready else 503, body, "application/json")
                elif path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._send(200, outer.metrics.render(), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = _Server6 if ":" in host else _Server
        try:
            self.httpd = server((host, port), Handler)
        except OSError as exc:  # EADDRINUSE, EACCES, EADDRNOTAVAIL, or a host name that does not resolve
            reason = exc.strerror or str(exc)
            raise ConfigError(f"service.listen: cannot listen on {listen}: {reason}") from None
        self.address = listen
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

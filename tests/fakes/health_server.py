"""A consumer's health endpoint on loopback, for the http probe: answers with a set status and can run a
hook when probed (to change the world at exactly that moment)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HealthServer:
    def __init__(self, status: int = 200, *, port: int = 0) -> None:
        """``port``: listen there (say, where a stopped one listened: the consumer is back)."""
        self.status = status
        self.hits = 0
        self.on_probe: Callable[[], None] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.hits += 1
                if server.on_probe:
                    server.on_probe()
                body = b"ok" if server.status < 400 else b"failing"
                self.send_response(server.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/healthz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

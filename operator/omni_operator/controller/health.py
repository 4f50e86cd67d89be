"""The operator's health endpoint: /healthz (alive) and /readyz (leading, watches running)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve_health(port: int, ready: threading.Event) -> None:
    """/healthz: the process is alive (followers waiting for the lease too);
    /readyz: this process holds the lease and its watches are running."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            if self.path.startswith("/healthz"):
                ok = True
            elif self.path.startswith("/readyz"):
                ok = ready.is_set()
            else:
                self.send_error(404)
                return
            body = b"ok\n" if ok else b"not ready\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # probes every few seconds: keep them out of the log
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()

"""A minimal Kubernetes API client over HTTPS (standard library only).

Used by LocalCluster (health checks, node registration, raw requests in tests) and by the
node agent, which must not depend on the packages under test.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Errors a request may raise while the apiserver is down or restarting.
TRANSPORT_ERRORS = (OSError, ssl.SSLError, http.client.HTTPException)

_CONTENT_TYPES = {"merge": "application/merge-patch+json", "strategic": "application/strategic-merge-patch+json",
                  "json": "application/json-patch+json"}


class KubeApi:
    """Requests as one client certificate, with a bearer token, or anonymously."""

    def __init__(self, server: str, ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None):
        self.server = server
        url = urlsplit(server)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self._plain = ssl.create_default_context(cafile=str(ca_file))
        self._cert = ssl.create_default_context(cafile=str(ca_file))
        if cert_file and key_file:
            self._cert.load_cert_chain(str(cert_file), str(key_file))

    @classmethod
    def from_kubeconfig(cls, path: Path) -> "KubeApi":
        """The current context of a kubeconfig whose certificates are inline (``*-data``)."""
        config = json.loads(Path(path).read_text())  # the harness writes kubeconfigs as JSON
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
        # ssl loads certificates from files only: write them to a private directory while loading
        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            for key in ("certificate-authority-data", "client-certificate-data", "client-key-data"):
                data = user.get(key) or cluster.get(key)
                files[key] = Path(tmp) / key
                files[key].write_bytes(base64.b64decode(data))
            return cls(cluster["server"], files["certificate-authority-data"],
                       files["client-certificate-data"], files["client-key-data"])

    def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, anonymous: bool = False,
        patch: str = "merge", timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """Returns (HTTP status, parsed JSON or text). ``patch``: merge, strategic or json."""
        ctx = self._plain if (token or anonymous) else self._cert
        conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            headers["Content-Type"] = _CONTENT_TYPES[patch] if method == "PATCH" else "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

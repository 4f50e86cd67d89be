"""A Git server on loopback: bare repositories served over smart HTTP by `git http-backend`.

    server = GitHttpServer(root).start()          # http://127.0.0.1:<port>/<name>.git
    repo = server.create("platform")               # a bare repo and a working copy to commit from
    sha = repo.commit({"deploy/omni.yaml": text}, "add the deployment")   # pushed to the bare repo
    server.stop()

`git http-backend` is Git's own CGI program for the smart HTTP protocol (upload-pack for clones and
fetches, receive-pack for pushes where a repository allows it); this module is only the web server
in front of it. Flux's source-controller clones from it like from any Git host (anonymous, read-only).
Only the standard library and the `git` command.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Mapping

BRANCH = "main"
AUTHOR = {"GIT_AUTHOR_NAME": "Platform Team", "GIT_AUTHOR_EMAIL": "platform@example.com",
          "GIT_COMMITTER_NAME": "Platform Team", "GIT_COMMITTER_EMAIL": "platform@example.com"}


def http_backend() -> str:
    """The path of `git http-backend` (it lives in git's exec path, not on PATH)."""
    exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()
    backend = Path(exec_path) / "git-http-backend"
    if not os.access(backend, os.X_OK):
        raise RuntimeError(f"no git-http-backend in {exec_path}: install git (Debian: apt-get install git)")
    return str(backend)


def _git(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **AUTHOR, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


class _CgiHandler(http.server.BaseHTTPRequestHandler):
    """Hands every request to `git http-backend` as CGI (RFC 3875) and relays its answer."""

    protocol_version = "HTTP/1.1"
    root: Path
    backend: str

    def do_GET(self) -> None:  # noqa: N802
        self._cgi(b"")

    def do_POST(self) -> None:  # noqa: N802
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._cgi(body)

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _cgi(self, body: bytes) -> None:
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "SERVER_PROTOCOL": self.request_version,
            "GATEWAY_INTERFACE": "CGI/1.1",
        }
        for header in ("Content-Encoding", "Git-Protocol"):  # gzip'ed requests; protocol v2
            if self.headers.get(header):
                env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
        result = subprocess.run([self.backend], input=body, capture_output=True, env=env)
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = result.stdout.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        if result.returncode != 0 and not head:
            status, payload = 500, result.stderr
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


class GitRepo:
    """A bare repository the server serves, and a working copy next to it that commits and pushes."""

    def __init__(self, bare: Path, work: Path, url: str):
        self.bare, self.work, self.url = bare, work, url

    def commit(self, files: Mapping[str, str | None], message: str) -> str:
        """Write (or, for None, delete) the given files, commit and push; the new commit's SHA."""
        for name, content in files.items():
            path = self.work / name
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
        _git("add", "-A", cwd=self.work)
        _git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        _git("push", "-q", "origin", BRANCH, cwd=self.work)
        return self.head()

    def head(self) -> str:
        return _git("rev-parse", "HEAD", cwd=self.work)

    def read(self, name: str) -> str | None:
        path = self.work / name
        return path.read_text() if path.exists() else None


class GitHttpServer:
    """Serves the bare repositories under `root` at http://127.0.0.1:<port>/<name>.git."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the Git server is not running")
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> "GitHttpServer":
        self.root.mkdir(parents=True, exist_ok=True)
        handler = type("Handler", (_CgiHandler,), {"root": self.root, "backend": http_backend()})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="git-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def create(self, name: str) -> GitRepo:
        """A new bare repository `<name>.git` with a working copy that pushes to it."""
        bare = self.root / f"{name}.git"
        work = self.root.parent / f"{name}-work"
        shutil.rmtree(bare, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        _git("init", "-q", "--bare", f"--initial-branch={BRANCH}", str(bare))
        _git("init", "-q", f"--initial-branch={BRANCH}", str(work))
        _git("remote", "add", "origin", str(bare), cwd=work)
        return GitRepo(bare, work, f"{self.url}/{name}.git")

    def __enter__(self) -> "GitHttpServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

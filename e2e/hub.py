"""A stand-in for the Hugging Face hub, for the loader tests and the demo only.

The public hub cannot be reached from the tests (and a 60 GB checkpoint would not fit
in them anyway), so this is a real HTTP server on loopback that answers the requests
huggingface_hub makes for `HfApi.model_info(repo, revision, files_metadata=True)` and
`hf_hub_download(repo, name, revision, local_dir=...)`, the way the hub answers them:

- `GET /api/models/{repo}[/revision/{rev}]?blobs=true`: `id`, `sha` (the commit), `gated`,
  `private`, `siblings[]` with `rfilename`, `size`, `blobId` and, for LFS files, `lfs`
  {`size`, `sha256`, `pointerSize`}. Readable without a token even for gated repos.
- `HEAD|GET /{repo}/resolve/{rev}/{name}`: `X-Repo-Commit`, `ETag`. Regular files (git
  blobs: everything but `*.safetensors`) answer 200 with `ETag: "<blob sha1>"` and the
  body; LFS files (`*.safetensors`) answer 302 to a second, "CDN" listener (other host name) with
  `X-Linked-Etag: "<sha256>"` and `X-Linked-Size`, as the hub redirects to its CDN (a
  different origin, so the client drops the Authorization header there; the URL is
  signed instead).
- `HEAD|GET` on the CDN: the bytes, with `Range` (206) for resumed downloads.
- Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
  `GatedRepo`), which is how huggingface_hub picks its exception class.

Not implemented: xet storage, listing/search, uploads, datasets and spaces.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import struct
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit


@dataclass(frozen=True)
class _File:
    path: Path
    size: int
    blob_id: str
    sha256: str | None  # set for LFS files


def _blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _snapshot(directory: Path) -> tuple[str, dict[str, _File]]:
    """The files of a revision (hashes taken now, bytes read when served) and its commit sha."""
    files, commit = {}, hashlib.sha1()
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        data = p.read_bytes()
        if rel.endswith(".safetensors"):  # git holds an LFS pointer; its blob id is the pointer's
            lfs = hashlib.sha256(data).hexdigest()
            files[rel] = _File(p, len(data), _blob_sha1(_lfs_pointer(lfs, len(data))), lfs)
        else:
            files[rel] = _File(p, len(data), _blob_sha1(data), None)
        commit.update(rel.encode() + b"\0" + data)
    return commit.hexdigest(), files


class HubStandIn:
    """A real HTTP server on loopback implementing the parts of the hub's API huggingface_hub uses.

    `requests` lists the paths served (both origins, in order); `downloads` the file names
    whose bytes were sent. `chunk_delay` seconds are slept between `chunk_size` pieces of a
    body, so a download can be watched while it runs.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, chunk_delay: float = 0.0,
                 chunk_size: int = 64 * 1024):
        self.host, self._port = host, port
        self.chunk_delay, self.chunk_size = chunk_delay, chunk_size
        self.requests: list[str] = []
        self.downloads: list[str] = []
        self._repos: dict[str, dict] = {}
        self._default: tuple[str, dict[str, _File]] | None = None
        self._failures: list[tuple[int, str | None]] = []
        self._secret = random.randbytes(16)
        self._lock = threading.Lock()
        self._servers: list[_Server] = []

    # -- repositories
    def add(self, repo: str, revisions: dict[str, Path], *, token: str | None = None) -> None:
        by_name = {name: _snapshot(Path(d)) for name, d in revisions.items()}
        with self._lock:
            self._repos[repo] = {"token": token, "revisions": by_name}

    def set_default(self, directory: Path) -> None:
        with self._lock:
            self._default = _snapshot(Path(directory))

    def commit(self, repo: str, revision: str = "main") -> str:
        """The commit sha a revision (branch name) of an added repository resolves to."""
        entry, found = self._revision(repo, revision)
        if found is None:
            raise KeyError(f"{repo}@{revision}")
        return found[0]

    def fail_next(self, n: int, status: int = 500, *, match: str | None = None) -> None:
        """The next n file downloads (of files whose name contains `match`, if given) answer `status`."""
        with self._lock:
            self._failures.extend([(status, match)] * n)

    def _revision(self, repo: str, rev: str) -> tuple[dict | None, tuple[str, dict[str, _File]] | None]:
        with self._lock:
            entry = self._repos.get(repo)
            if entry is None and self._default is not None:
                entry = {"token": None, "revisions": {"main": self._default}}
        if entry is None:
            return None, None
        revs = entry["revisions"]
        found = revs.get(rev) or next((r for r in revs.values() if r[0] == rev), None)
        return entry, found

    def _take_failure(self, name: str) -> int | None:
        with self._lock:
            for i, (status, match) in enumerate(self._failures):
                if match is None or match in name:
                    del self._failures[i]
                    return status
        return None

    def _signature(self, sha256: str, name: str) -> str:
        return hmac.new(self._secret, f"{sha256}/{name}".encode(), "sha256").hexdigest()[:32]

    # -- lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        # Another host name for the same loopback listener: huggingface_hub follows a redirect to the
        # same host (some releases compare the name only, not the port) but not one to a CDN.
        name = "127.0.0.1" if self.host == "localhost" else "localhost"
        return f"http://{name}:{self._servers[1].server_address[1]}"

    def start(self) -> "HubStandIn":
        for port, handler in ((self._port, _HubHandler), (0, _CdnHandler)):
            server = _Server((self.host, port), type(handler.__name__, (handler,), {"hub": self}))
            threading.Thread(target=server.serve_forever, name="hub-stand-in", daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> "HubStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that went away is no news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandIn

    def log_message(self, *args) -> None:  # the tests read `hub.requests` instead
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        parts = urlsplit(self.path)
        with self.hub._lock:
            self.hub.requests.append(parts.path)
        self.handle_path(unquote(parts.path), parse_qs(parts.query), head)

    def reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"",
              head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def error(self, status: int, code: str | None, message: str, head: bool, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self.reply(status, headers, json.dumps({"error": message}).encode(), head)

    def send_file(self, name: str, f: _File, headers: dict[str, str], head: bool) -> None:
        """The file's bytes (or the requested range), in slow chunks when asked to."""
        status = None if head else self.hub._take_failure(name)
        if status is not None:
            return self.error(status, None, f"injected failure for {name}", head)
        data = f.path.read_bytes()  # read now: a test may corrupt the file after add()
        start, status, total = 0, 200, len(data)
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            start, end = int(first or 0), int(last) if last else total - 1
            if start >= total:
                return self.reply(416, {"Content-Range": f"bytes */{total}"}, head=head)
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{total}"
        headers |= {"Content-Length": str(len(data)), "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream"}
        self.reply(status, headers, head=True)
        if head:
            return
        with self.hub._lock:
            self.hub.downloads.append(name)
        step = max(1, self.hub.chunk_size)
        for i in range(0, len(data), step):
            self.wfile.write(data[i:i + step])
            if self.hub.chunk_delay:
                time.sleep(self.hub.chunk_delay)


class _HubHandler(_Handler):
    def handle_path(self, path: str, query: dict, head: bool) -> None:
        if path.startswith("/api/models/"):
            repo, _, rev = path[len("/api/models/"):].partition("/revision/")
            return self.model_info(repo, rev or "main", "true" in query.get("blobs", []), head)
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        if not sep:
            return self.error(404, None, "Not Found", head)
        rev, _, name = rest.partition("/")
        self.resolve(repo, rev, name, head)

    def model_info(self, repo: str, rev: str, blobs: bool, head: bool) -> None:
        entry, found = self.hub._revision(repo, rev)
        if entry is None:
            return self.error(401 if not self.headers.get("Authorization") else 404, "RepoNotFound",
                              "Repository not found", head)
        if found is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        commit, files = found
        siblings = []
        for name, f in files.items():
            s = {"rfilename": name}
            if blobs:
                s |= {"size": f.size, "blobId": f.blob_id}
                if f.sha256:
                    s["lfs"] = {"size": f.size, "sha256": f.sha256,
                                "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
            siblings.append(s)
        body = {"_id": commit[:24], "id": repo, "modelId": repo, "sha": commit, "private": False,
                "gated": "manual" if entry["token"] else False, "disabled": False,
                "lastModified": "2025-09-22T00:00:00.000Z", "tags": [], "siblings": siblings}
        self.reply(200, {"Content-Type": "application/json"}, json.dumps(body).encode(), head)

    def resolve(self, repo: str, rev: str, name: str, head: bool) -> None:
        entry, found = self.hub._revision(repo, rev)
        auth = self.headers.get("Authorization", "")
        if entry is None:
            return self.error(401 if not auth else 404, "RepoNotFound", "Repository not found", head)
        if entry["token"] and auth != f"Bearer {entry['token']}":
            # no token: 401; a token without access: 403 (both GatedRepo, as the hub does)
            return self.error(403 if auth else 401, "GatedRepo",
                              f"Access to model {repo} is restricted. You must have access to it "
                              "and be authenticated to access it. Please log in.", head)
        if found is None:
            return self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        commit, files = found
        f = files.get(name)
        if f is None:
            return self.error(404, "EntryNotFound", f"{name} does not exist on \"{rev}\"", head, commit)
        headers = {"X-Repo-Commit": commit}
        if f.sha256 is None:
            return self.send_file(name, f, headers | {"ETag": f'"{f.blob_id}"'}, head)
        location = (f"{self.hub.cdn_url}/lfs/{f.sha256}/{quote(name)}"
                    f"?sig={self.hub._signature(f.sha256, name)}")
        self.reply(302, headers | {"Location": location, "ETag": f'"{f.blob_id}"',
                                   "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)},
                   head=head)


class _CdnHandler(_Handler):
    def handle_path(self, path: str, query: dict, head: bool) -> None:
        sha256, _, name = path.removeprefix("/lfs/").partition("/")
        if not path.startswith("/lfs/") or query.get("sig", [""])[0] != self.hub._signature(sha256, name):
            return self.error(403, None, "Request has expired or is not signed", head)
        with self.hub._lock:
            snapshots = [s for e in self.hub._repos.values() for s in e["revisions"].values()]
            snapshots += [self.hub._default] if self.hub._default else []
        f = next((f for _, files in snapshots for n, f in files.items()
                  if n == name and f.sha256 == sha256), None)
        if f is None:
            return self.error(404, None, "NoSuchKey", head)
        self.send_file(name, f, {"ETag": f'"{sha256}"'}, head)


def _safetensors(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file: u64 little-endian header length, JSON header (8-byte aligned), data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(d for _, _, d in tensors.values())


def write_placeholder_checkpoint(directory: Path, *, seed: int = 0, shards: int = 1,
                                 tensor_bytes: int = 4096) -> Path:
    """config.json, tokenizer_config.json and valid safetensors weights (one file, or `shards`
    files plus model.safetensors.index.json), for tests and the demo that need weights to
    exist but never load them. `tensor_bytes` (a multiple of 4) sizes each shard's tensor."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (directory / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
         "placeholder": True, "seed": seed}, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32768}, indent=2) + "\n")
    names = (["model.safetensors"] if shards == 1 else
             [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)])
    weight_map = {}
    for i, fname in enumerate(names):
        key = f"thinker.model.layers.{i}.weight"
        (directory / fname).write_bytes(_safetensors({key: ("F32", [tensor_bytes // 4], rng.randbytes(tensor_bytes))}))
        weight_map[key] = fname
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": shards * tensor_bytes}, "weight_map": weight_map}, indent=2) + "\n")
    return directory

"""Hand-off of multimodal thinker states from the vLLM engine process to the launcher.

The vLLM plugin (in the engine-core worker) writes one file per request into
OMNI_MM_STATES_DIR; the launcher serves it once on its metrics port as payload v1's `mm`
object (`GET /v1/omni/mm-states/<rid>`) and deletes it, or drops it after
OMNI_MM_STATES_TTL_SECONDS, oldest first beyond OMNI_MM_STATES_MAX_BYTES.

File `<rid>.oms`: b"OMS1", a 4-byte little-endian header length, the header (JSON: the
`mm` object without `data`, or {"error": ...} when the states cannot be produced), then
the rows as raw little-endian bytes. Written under a temporary name and renamed, so a
reader never sees half a file.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omni_runtime.thinker.mm_capture import RID

MAGIC = b"OMS1"
SUFFIX = ".oms"
DEFAULT_TTL_SECONDS = 120.0
DEFAULT_MAX_BYTES = 1 << 30


def default_dir() -> str:
    """A per-launcher directory, in memory where the host has /dev/shm."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"omni-mm-states-{os.getpid()}")


def encode_file(header: dict, raw: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + raw


def decode_file(blob: bytes) -> tuple[dict, bytes]:
    if blob[:4] != MAGIC or len(blob) < 8:
        raise ValueError("not an mm-states file")
    (n,) = struct.unpack("<I", blob[4:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_atomic(directory: str | os.PathLike, rid: str, blob: bytes) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / (rid + SUFFIX)
    tmp = d / f".{rid}.{os.getpid()}.tmp"
    tmp.write_bytes(blob)
    os.replace(tmp, final)
    return final


def mm_object(header: dict, raw: bytes) -> dict:
    """Payload v1's `mm` object from a decoded file."""
    return {**header, "data": base64.b64encode(raw).decode("ascii")}


@dataclass(frozen=True)
class Entry:
    name: str
    mtime: float
    size: int


def sweep_plan(entries: list[Entry], now: float, ttl: float, max_bytes: int) -> list[str]:
    """Names to delete: everything older than `ttl`, then the oldest until the rest fit."""
    drop = [e.name for e in entries if now - e.mtime > ttl]
    keep = sorted((e for e in entries if now - e.mtime <= ttl), key=lambda e: e.mtime)
    total = sum(e.size for e in keep)
    for e in keep:
        if total <= max_bytes:
            break
        drop.append(e.name)
        total -= e.size
    return drop


class MMStatesStore:
    """The launcher's side: look up, serve once, expire."""

    def __init__(self, directory: str | os.PathLike, ttl: float = DEFAULT_TTL_SECONDS,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.dir = Path(directory)
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)

    def take(self, rid: str) -> dict | None:
        """The `mm` object for `rid` (removed from the store), {"error": ...} when the
        states could not be produced, or None when there is nothing (yet).
        Raises ValueError for a malformed rid (it becomes a file name)."""
        if not RID.match(rid):
            raise ValueError("request id must match [A-Za-z0-9-]{1,64}")
        path = self.dir / (rid + SUFFIX)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        header, raw = decode_file(blob)
        if "error" in header:
            # Kept until it expires: a caller retrying on 404 keeps reading the reason.
            return header
        path.unlink(missing_ok=True)
        return mm_object(header, raw)

    def entries(self) -> list[Entry]:
        out = []
        for p in self.dir.glob("*" + SUFFIX):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append(Entry(p.name, st.st_mtime, st.st_size))
        return out

    def sweep(self, now: float | None = None) -> list[str]:
        dropped = sweep_plan(self.entries(), time.time() if now is None else now, self.ttl, self.max_bytes)
        for name in dropped:
            (self.dir / name).unlink(missing_ok=True)
        return dropped

    def remove_all(self) -> None:
        for p in list(self.dir.glob("*" + SUFFIX)) + list(self.dir.glob(".*.tmp")):
            p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass

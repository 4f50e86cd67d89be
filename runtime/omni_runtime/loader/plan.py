"""What the weight loader fetches and how it judges the result: the pure parts of
`omni-runtime fetch-weights` (file selection, free space, error sentences) and the small
file-level helpers (verification, manifest, durable writes, the volume lock)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PERMANENT, TRANSIENT = 2, 1
MANIFEST = ".omni-weights.json"
WANTED_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model", ".tiktoken")
DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_FIX = "set spec.model.tokenSecretRef to a Secret whose token may read it"


class LoaderError(Exception):
    """One sentence for the user and the exit code (PERMANENT or TRANSIENT)."""

    def __init__(self, sentence: str, code: int = TRANSIENT):
        super().__init__(sentence)
        self.sentence, self.code = sentence, code


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 (of the pointer, for LFS files)

    def manifest_entry(self) -> dict:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "blobId": self.blob_id}


def wanted(name: str, referenced: frozenset[str] | set[str] = frozenset()) -> bool:
    """Config, tokenizer and safetensors files; top level only unless a weight index names them
    (so never *.bin/*.pt/*.onnx/*.gguf duplicates of the weights, nor README/examples)."""
    return name.endswith(WANTED_SUFFIXES) and ("/" not in name or name in referenced)


def select_files(files: list[RemoteFile], referenced: frozenset[str] | set[str] = frozenset()) -> list[RemoteFile]:
    """The files to fetch, small ones first: the index must be read before the shards."""
    return sorted((f for f in files if wanted(f.name, referenced)),
                  key=lambda f: (f.name.endswith(".safetensors"), f.name))


def index_references(index: dict) -> set[str]:
    return set((index.get("weight_map") or {}).values())


def human_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def space_problem(free: int, missing: int) -> str | None:
    if missing <= free:
        return None
    return (f"the volume has {human_bytes(free)} free but the checkpoint needs {human_bytes(missing)} more: "
            "raise spec.model.cache.size")


_STALE = re.compile(r"^[^.]+\.[^.]+\.[0-9a-f]{8}\.incomplete$")


def is_stale_incomplete(name: str) -> bool:
    """Recent huggingface_hub releases download into `<hash>.<etag>.<8 hex>.incomplete`, unique to
    the process, which no later run resumes; older ones into `<hash>.<etag>.incomplete`, which
    hf_hub_download resumes with a Range request."""
    return _STALE.match(name) is not None


def explain(exc: BaseException, *, repo: str, revision: str, endpoint: str | None, token_given: bool,
            doing: str = "") -> LoaderError:
    """huggingface_hub's exceptions as one sentence and an exit code."""
    if isinstance(exc, LoaderError):
        return exc
    from huggingface_hub import errors as hf

    where = endpoint or DEFAULT_ENDPOINT
    # a failed HEAD surfaces as LocalEntryNotFoundError("... not in the local cache") from the HTTP error
    cause = exc.__cause__ if isinstance(exc, hf.LocalEntryNotFoundError) and exc.__cause__ else exc
    status = getattr(getattr(cause, "response", None), "status_code", None)
    http = f"HTTP {status}{' ' + doing if doing else ''}"
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return LoaderError(f"the volume ran out of space {doing or 'while writing'}: raise spec.model.cache.size",
                           PERMANENT)
    if isinstance(cause, PermissionError) or (isinstance(cause, OSError) and cause.errno == errno.EROFS):
        return LoaderError(f"the loader may not write to the weights volume ({cause}): the Job must mount it "
                           "read-write, writable by the container's user (fsGroup)", PERMANENT)
    if isinstance(cause, hf.GatedRepoError) or (
            status in (401, 403) and not isinstance(cause, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError))):
        refused = "the hub refused the token" if token_given else "no token was given"
        return LoaderError(f"repository {repo} is gated or private and {refused} ({http}): {TOKEN_FIX}", PERMANENT)
    if isinstance(cause, hf.RevisionNotFoundError):
        return LoaderError(f"revision {revision} of repository {repo} was not found on {where} ({http}): "
                           "set spec.model.revision to an existing branch, tag or commit", PERMANENT)
    if isinstance(cause, hf.RepositoryNotFoundError):
        return LoaderError(f"repository {repo} was not found on {where} ({http}): check spec.model.repo, "
                           f"and if it is private {TOKEN_FIX}", PERMANENT)
    if status is not None:
        return LoaderError(f"the hub at {where} answered {http} for repository {repo}: "
                           "a temporary failure, the Job retries", TRANSIENT)
    detail = (str(cause).strip().splitlines() or [""])[0][:200]
    return LoaderError(f"could not fetch {repo}@{revision} from {where}{' ' + doing if doing else ''} "
                       f"({type(cause).__name__}: {detail}): check spec.model.cache.endpoint and the network; "
                       "the Job retries", TRANSIENT)


# ---- the volume (no network)

def complete_manifest(final: Path) -> dict | None:
    """The manifest of `final` if every file it lists is there with its size."""
    try:
        manifest = json.loads((final / MANIFEST).read_text())
        ok = all((final / f["name"]).stat().st_size == f["size"] for f in manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if ok else None


def file_digest(path: Path, lfs: bool) -> str:
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, f: RemoteFile) -> str | None:
    """None when the file on disk is the one the hub lists, else what differs."""
    size = path.stat().st_size if path.is_file() else None
    if size != f.size:
        return f"it has {size} bytes but the hub lists {f.size}"
    kind, expected = ("sha256", f.sha256) if f.sha256 else ("git blob sha1", f.blob_id)
    got = file_digest(path, lfs=bool(f.sha256)) if expected else None
    return None if got == expected else f"its {kind} is {got[:12]}… but the hub lists {expected[:12]}…"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    fsync_path(tmp)
    os.replace(tmp, path)


@contextmanager
def volume_lock(root: Path):
    """Serialises loaders on one volume (a replaced pod may overlap the one it replaces)."""
    with open(root / ".lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:  # some network filesystems refuse flock; go on without it
            logging.getLogger(__name__).warning("could not lock %s: %s", root / ".lock", exc)
        yield

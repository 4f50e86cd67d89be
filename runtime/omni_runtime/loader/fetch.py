"""`omni-runtime fetch-weights`: copy one revision of a model repository onto the weights volume.

The operator runs this once per (repo, revision) as a Job; the thinker and talker pods then
mount the same volume read-only and never download anything. Layout under OMNI_WEIGHTS_DIR:

    model/                      the checkpoint; exists only when complete (a rename of .partial/)
    model/.omni-weights.json    {repo, revision, commit, bytes, files[{name,size,sha256,blobId}], completedAt}
    .partial/                   the download in progress; a rerun keeps every verified file

Exit 0 when done (the termination log gets {"commit","bytes","files","revision"} on one line),
2 on a permanent error (no retry can fix it), 1 on a transient one. On failure the last line
on stderr and the termination log hold one sentence saying what failed and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from omni_runtime.config import DEFAULT_TERMINATION_LOG, ConfigError, Env, LoaderSettings, write_termination_log
from omni_runtime.loader.plan import (DEFAULT_ENDPOINT, MANIFEST, PERMANENT, TRANSIENT, LoaderError, RemoteFile,
                                      complete_manifest, explain, fsync_path, human_bytes, index_references,
                                      is_stale_incomplete, select_files, space_problem, verify, volume_lock,
                                      write_json)

log = logging.getLogger("omni.loader")

VERIFIED = ".omni-verified.json"  # in .partial/: files already checked, so a rerun skips them


class Progress:
    """omni_weights_* gauges. bytes_done is the finished files plus the downloads in flight,
    polled from the partial directory about once per second; it never goes down within a run."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.bytes_total = Gauge("omni_weights_bytes_total", "Bytes of checkpoint files to fetch", registry=r)
        self.bytes_done = Gauge("omni_weights_bytes_done", "Bytes fetched so far, partial downloads included",
                                registry=r)
        self.files_total = Gauge("omni_weights_files_total", "Checkpoint files to fetch", registry=r)
        self.files_done = Gauge("omni_weights_files_done", "Checkpoint files fetched and verified", registry=r)
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._finished = self._shown = self._total = 0
        self._incomplete_dir: Path | None = None

    def plan(self, files: list[RemoteFile]) -> None:
        with self._lock:
            self._total = sum(f.size for f in files)
            self.bytes_total.set(self._total)
            self.files_total.set(len(files))

    def finished(self, f: RemoteFile) -> None:
        with self._lock:
            self._finished += f.size
            self.files_done.inc()
        self.refresh()

    def refresh(self) -> None:
        in_flight = 0
        if self._incomplete_dir is not None:
            for p in self._incomplete_dir.rglob("*.incomplete"):
                try:
                    in_flight += p.stat().st_size
                except FileNotFoundError:  # moved into place meanwhile
                    pass
        with self._lock:
            self._shown = max(self._shown, min(self._finished + in_flight, self._total))
            self.bytes_done.set(self._shown)

    def watch(self, incomplete_dir: Path, interval: float = 1.0) -> None:
        self._incomplete_dir = incomplete_dir

        def loop():
            while not self._stop.wait(interval):
                self.refresh()

        threading.Thread(target=loop, name="weights-progress", daemon=True).start()

    def close(self) -> None:
        self._stop.set()


# ---- the process

def summary(manifest: dict) -> dict:
    """What the termination log carries on success (the operator reads the commit from it)."""
    return {"commit": manifest["commit"], "bytes": manifest["bytes"], "files": len(manifest["files"]),
            "revision": manifest["revision"]}


def fetch(cfg: LoaderSettings, *, progress: Progress | None = None, free_bytes=lambda p: shutil.disk_usage(p).free) -> dict:
    """Make `<weights_dir>/model` hold cfg's repo at cfg's revision; returns the manifest."""
    root = Path(cfg.weights_dir)
    final, partial = root / "model", root / ".partial"
    progress = progress or Progress()
    root.mkdir(parents=True, exist_ok=True)
    with volume_lock(root):
        done = complete_manifest(final)
        if done is not None:
            if (done.get("repo"), done.get("revision")) != (cfg.repo, cfg.revision):
                raise LoaderError(f"the volume at {root} already holds {done.get('repo')}@{done.get('revision')}, "
                                  f"not {cfg.repo}@{cfg.revision}: give each model revision its own volume",
                                  PERMANENT)
            progress.plan([RemoteFile(f["name"], f["size"], None, None) for f in done["files"]])
            for f in done["files"]:
                progress.finished(RemoteFile(f["name"], f["size"], None, None))
            log.info("%s already holds %s@%s (commit %s)", final, done["repo"], done["revision"], done["commit"])
            return done
        if final.exists():  # incomplete or damaged: never leave it visible; keep its files to reuse
            if partial.exists():
                shutil.rmtree(final)
            else:
                os.rename(final, partial)
            (partial / MANIFEST).unlink(missing_ok=True)
        return _download_all(cfg, root, partial, progress, free_bytes)


def _hub_call(cfg: LoaderSettings, doing: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one sentence and an exit code
        raise explain(exc, repo=cfg.repo, revision=cfg.revision, endpoint=cfg.endpoint,
                      token_given=cfg.token is not None, doing=doing) from exc


def _download_all(cfg: LoaderSettings, root: Path, partial: Path, progress: Progress, free_bytes) -> dict:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # one log line per file instead of tqdm bars in the pod log
    repo, endpoint, token = cfg.repo, cfg.endpoint, cfg.token
    info = _hub_call(cfg, "while listing the repository", HfApi(endpoint=endpoint, token=token).model_info,
                     repo, revision=cfg.revision, files_metadata=True)
    commit, siblings = info.sha, info.siblings or []
    if unsized := [s.rfilename for s in siblings if s.size is None]:
        raise LoaderError(f"the hub at {endpoint or DEFAULT_ENDPOINT} listed {unsized[0]} without a size: "
                          "point spec.model.cache.endpoint at a Hugging Face hub or a mirror of its API", PERMANENT)
    listed = [RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id) for s in siblings]
    by_name = {f.name: f for f in listed}
    partial.mkdir(exist_ok=True)
    incomplete_dir = partial / ".cache" / "huggingface" / "download"
    for p in incomplete_dir.rglob("*.incomplete") if incomplete_dir.exists() else []:
        if is_stale_incomplete(p.name):  # left by a killed run; it only takes space
            p.unlink(missing_ok=True)
    verified_path = partial / VERIFIED
    try:
        verified = json.loads(verified_path.read_text())
    except (OSError, ValueError):
        verified = {}

    fetched: set[str] = set()

    def get(f: RemoteFile) -> Path:
        path = partial / f.name
        if f.name in fetched:
            return path
        fetched.add(f.name)
        record = {"size": f.size, "sha256": f.sha256, "blobId": f.blob_id}
        if verified.get(f.name) == record | {"mtime_ns": path.stat().st_mtime_ns if path.exists() else None}:
            progress.finished(f)  # verified by an earlier run
            return path
        # a complete file without a record (a run killed before recording it, or a damaged
        # final directory set aside) is checked here rather than fetched again
        if path.is_file() and path.stat().st_size == f.size and verify(path, f) is None:
            log.info("%s is already on the volume", f.name)
        else:
            path.unlink(missing_ok=True)
            log.info("fetching %s (%s)", f.name, human_bytes(f.size))
            _hub_call(cfg, f"while downloading {f.name}", hf_hub_download, repo, f.name, revision=commit,
                      local_dir=partial, endpoint=endpoint, token=token)
            if problem := verify(path, f):
                path.unlink(missing_ok=True)
                raise LoaderError(f"{f.name} of {repo}@{commit[:12]} failed verification ({problem}): it was deleted "
                                  "and the Job retries the download", TRANSIENT)
        fsync_path(path)
        verified[f.name] = record | {"mtime_ns": path.stat().st_mtime_ns}
        write_json(verified_path, verified)
        progress.finished(f)
        return path

    selection = select_files(listed)
    progress.plan(selection)
    progress.watch(incomplete_dir)
    referenced: set[str] = set()
    for f in [f for f in selection if f.name.endswith(".safetensors.index.json")]:
        try:
            referenced |= index_references(json.loads(get(f).read_text()))
        except (ValueError, AttributeError) as exc:
            raise LoaderError(f"{f.name} of {repo}@{commit[:12]} is not a valid weight index ({exc}): "
                              "use a repository with a valid checkpoint", PERMANENT) from exc
    if absent := sorted(referenced - by_name.keys()):
        raise LoaderError(f"the weight index of {repo}@{commit[:12]} names {absent[0]}, which the repository "
                          "does not have: use a complete revision", PERMANENT)
    selection = select_files(listed, referenced)
    if not any(f.name.endswith(".safetensors") for f in selection):
        raise LoaderError(f"repository {repo}@{cfg.revision} has no *.safetensors weights: "
                          "use a repository that publishes safetensors", PERMANENT)
    progress.plan(selection)
    missing = sum(f.size for f in selection
                  if not ((partial / f.name).is_file() and (partial / f.name).stat().st_size == f.size))
    if problem := space_problem(free_bytes(root), missing):
        raise LoaderError(problem, PERMANENT)
    for f in selection:
        get(f)
    return _publish(cfg, partial, root / "model", commit, selection)


def _publish(cfg: LoaderSettings, partial: Path, final: Path, commit: str, selection: list[RemoteFile]) -> dict:
    """Write the manifest and rename the partial directory into place: all or nothing."""
    keep = {f.name for f in selection}
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    for p in sorted(partial.rglob("*"), reverse=True):
        rel = p.relative_to(partial).as_posix()
        if p.is_file() and rel not in keep:
            p.unlink()  # from an older commit of a moving branch, or our own bookkeeping
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    manifest = {"repo": cfg.repo, "revision": cfg.revision, "commit": commit,
                "bytes": sum(f.size for f in selection), "files": [f.manifest_entry() for f in selection],
                "completedAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    write_json(partial / MANIFEST, manifest)
    os.rename(partial, final)
    fsync_path(final.parent)
    log.info("%s holds %s@%s (commit %s, %d files, %s)", final, cfg.repo, cfg.revision, commit,
             len(selection), human_bytes(manifest["bytes"]))
    return manifest


def _fail(termination_log: str, error: LoaderError) -> int:
    write_termination_log(termination_log, error.sentence)
    sys.stderr.flush()
    print(error.sentence, file=sys.stderr, flush=True)  # the last line of the pod log
    return error.code


def run(environ=None) -> int:
    """The `fetch-weights` process: exit 0 done, 1 transient error, 2 permanent error."""
    environ = os.environ if environ is None else environ
    for name in ("httpx", "httpx2"):  # one line per HTTP request would bury the loader's own log
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = LoaderSettings.from_env(environ)
    except ConfigError as exc:
        return _fail(environ.get(Env.TERMINATION_LOG) or DEFAULT_TERMINATION_LOG,
                     LoaderError(f"configuration error: {exc}", PERMANENT))
    progress, server = Progress(), None
    if cfg.metrics_port:
        try:
            server, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=progress.registry)
        except OSError as exc:  # progress is nice to have, not a reason to fail the Job
            log.warning("no progress metrics on %s:%s: %s", cfg.host, cfg.metrics_port, exc)
    try:
        manifest = fetch(cfg, progress=progress)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one sentence and an exit code
        if not isinstance(exc, LoaderError):
            log.error("fetch-weights failed", exc_info=exc)
        return _fail(cfg.termination_log, explain(exc, repo=cfg.repo, revision=cfg.revision,
                                                     endpoint=cfg.endpoint, token_given=cfg.token is not None))
    finally:
        progress.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    line = json.dumps(summary(manifest))
    write_termination_log(cfg.termination_log, line)
    print(line, flush=True)
    return 0

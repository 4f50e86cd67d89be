"""`omni-runtime fetch-weights` against a real HTTP hub stand-in on loopback (e2e/hub.py):
the public hub is unreachable from the tests. The loader runs as a real subprocess where
the exit code, stderr and termination log are the behaviour under test, and in-process
where a test injects what cannot be provoked for real (a full volume)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from e2e.hub import HubStandIn, write_placeholder_checkpoint
from e2e.procs import free_port
from omni_runtime.config import LoaderSettings
from omni_runtime.loader import fetch as wl
from omni_runtime.loader.plan import LoaderError, RemoteFile, explain, is_stale_incomplete, select_files, space_problem
from omni_runtime.metrics import parse_prometheus_text

from .helpers import ROOT

pytestmark = pytest.mark.pure

REPO = "Qwen/Qwen3-Omni-Test"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
WANTED = {"config.json", "tokenizer_config.json", "model.safetensors.index.json", "chat_template.jinja",
          "merges.txt", *SHARDS}
TOKEN_FIX = "set spec.model.tokenSecretRef to a Secret whose token may read it"


def checkpoint(directory: Path, seed: int = 0) -> Path:
    """A sharded placeholder plus files a real repo has that the runtime does not need."""
    src = write_placeholder_checkpoint(directory, seed=seed, shards=3, tensor_bytes=32 * 1024)
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (src / "merges.txt").write_text("#version: 0.2\n")
    (src / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    (src / "README.md").write_text("# test\n")
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"\0" * 10)
    return src


@pytest.fixture
def src(tmp_path) -> Path:
    return checkpoint(tmp_path / "src")


@pytest.fixture
def hub(src):
    with HubStandIn() as h:
        h.add(REPO, {"main": src})
        yield h


@pytest.fixture
def online(monkeypatch):
    """In-process runs: tests/runtime/conftest.py puts huggingface_hub in offline mode for the whole session."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def loader_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNI_", "HF_"))}
    env |= {"OMNI_MODEL": REPO, "OMNI_WEIGHTS_DIR": str(tmp_path / "weights"), "OMNI_METRICS_PORT": "0",
            "OMNI_TERMINATION_LOG": str(tmp_path / "termination-log"), "HF_ENDPOINT": endpoint,
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return env | extra


def start_loader(tmp_path: Path, endpoint: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni_runtime.cli", "fetch-weights"], cwd=ROOT, text=True,
                            env=loader_env(tmp_path, endpoint, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def load(tmp_path: Path, endpoint: str, **extra: str) -> tuple[int, str, str, str]:
    """Run the loader to the end: exit code, last stdout line, last stderr line, termination log."""
    (tmp_path / "termination-log").unlink(missing_ok=True)
    proc = start_loader(tmp_path, endpoint, **extra)
    out, err = proc.communicate(timeout=120)
    log = tmp_path / "termination-log"
    last = lambda text: (text.strip().splitlines() or [""])[-1]  # noqa: E731
    return proc.returncode, last(out), last(err), log.read_text().strip() if log.exists() else ""


def in_process_cfg(tmp_path: Path, endpoint: str, **extra: str) -> LoaderSettings:
    return LoaderSettings.from_env(loader_env(tmp_path, endpoint, **extra))


def blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---- end to end, the loader as a subprocess

def test_full_download_publishes_a_verified_checkpoint_in_one_rename(tmp_path, hub, src):
    rc, out, err, log = load(tmp_path, hub.url)
    assert rc == 0, err
    commit = hub.commit(REPO)
    total = sum((src / n).stat().st_size for n in WANTED)
    assert json.loads(log) == json.loads(out) == {"commit": commit, "bytes": total, "files": len(WANTED),
                                                  "revision": "main"}
    weights = tmp_path / "weights"
    model = weights / "model"
    assert not (weights / ".partial").exists()
    on_disk = {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()}
    assert on_disk == WANTED | {".omni-weights.json"}  # no .bin, README, onnx/, nor huggingface_hub's .cache
    for name in WANTED:
        assert (model / name).read_bytes() == (src / name).read_bytes()
    manifest = json.loads((model / ".omni-weights.json").read_text())
    assert [manifest[k] for k in ("repo", "revision", "commit", "bytes")] == [REPO, "main", commit, total]
    datetime.strptime(manifest["completedAt"], "%Y-%m-%dT%H:%M:%SZ")
    files = {f["name"]: f for f in manifest["files"]}
    assert files.keys() == WANTED
    for name, f in files.items():
        data = (src / name).read_bytes()
        assert f["size"] == len(data)
        if name.endswith(".safetensors"):
            assert f["sha256"] == hashlib.sha256(data).hexdigest()
        else:
            assert (f["sha256"], f["blobId"]) == (None, blob_sha1(data))
    assert set(hub.downloads) == WANTED


def test_a_second_run_uses_the_volume_without_touching_the_hub(tmp_path, hub):
    assert load(tmp_path, hub.url)[0] == 0
    hub.requests.clear()
    rc, out, err, log = load(tmp_path, hub.url)
    assert rc == 0, err
    assert hub.requests == []
    assert json.loads(log)["commit"] == hub.commit(REPO)


def test_a_file_missing_from_the_final_directory_is_fetched_again_and_only_it(tmp_path, hub):
    assert load(tmp_path, hub.url)[0] == 0
    (tmp_path / "weights" / "model" / SHARDS[1]).unlink()
    hub.downloads.clear()
    rc, _, err, _ = load(tmp_path, hub.url)
    assert rc == 0, err
    assert hub.downloads == [SHARDS[1]]  # the rest was checked on disk, not fetched
    assert (tmp_path / "weights" / "model" / SHARDS[1]).is_file()


def test_resume_after_a_hub_failure_fetches_only_what_was_missing(tmp_path, hub):
    hub.fail_next(1, 503, match=SHARDS[1])
    rc, _, err, log = load(tmp_path, hub.url)
    assert rc == 1  # transient: the Job retries
    assert err == log
    assert f"HTTP 503 while downloading {SHARDS[1]}" in err and "the Job retries" in err
    assert not (tmp_path / "weights" / "model").exists()
    assert (tmp_path / "weights" / ".partial" / SHARDS[0]).is_file()
    first = set(hub.downloads)
    assert SHARDS[0] in first and SHARDS[2] not in first
    hub.downloads.clear()
    rc, _, err, _ = load(tmp_path, hub.url)
    assert rc == 0, err
    assert hub.downloads == SHARDS[1:]


def test_a_killed_loader_resumes_without_refetching_finished_files(tmp_path, hub):
    hub.chunk_delay, hub.chunk_size = 0.05, 4096  # ~0.4 s per shard
    proc = start_loader(tmp_path, hub.url)
    verified = tmp_path / "weights" / ".partial" / ".omni-verified.json"
    deadline = time.monotonic() + 60
    while SHARDS[0] not in (verified.read_text() if verified.exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, "the first shard never finished"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "weights" / "model").exists()
    done_before = set(json.loads(verified.read_text()))
    hub.chunk_delay, fetched_before = 0, set(hub.downloads)
    hub.downloads.clear()
    rc, _, err, _ = load(tmp_path, hub.url)
    assert rc == 0, err
    assert not set(hub.downloads) & done_before
    assert set(hub.downloads) | fetched_before == WANTED
    assert not list((tmp_path / "weights").rglob("*.incomplete"))


def test_gated_repository_needs_the_right_token(tmp_path, src):
    with HubStandIn() as hub:
        hub.add("Qwen/Gated", {"main": src}, token="hf_good")
        rc, _, err, log = load(tmp_path, hub.url, OMNI_MODEL="Qwen/Gated")
        assert rc == 2
        assert err == log
        assert err.startswith("repository Qwen/Gated is gated or private and no token was given (HTTP 401")
        assert err.endswith(TOKEN_FIX)
        rc, _, err, _ = load(tmp_path, hub.url, OMNI_MODEL="Qwen/Gated", HF_TOKEN="hf_bad")
        assert rc == 2
        assert err.startswith("repository Qwen/Gated is gated or private and the hub refused the token (HTTP 403")
        assert not (tmp_path / "weights" / "model").exists()
        rc, _, err, log = load(tmp_path, hub.url, OMNI_MODEL="Qwen/Gated", HF_TOKEN="hf_good")
        assert rc == 0, err
        assert json.loads(log)["commit"] == hub.commit("Qwen/Gated")


def test_unknown_repository_and_revision_are_permanent(tmp_path, hub):
    rc, _, err, log = load(tmp_path, hub.url, OMNI_MODEL="Qwen/Nope")
    assert rc == 2 and err == log
    assert err.startswith(f"repository Qwen/Nope was not found on {hub.url} (HTTP 401")
    assert "check spec.model.repo" in err
    rc, _, err, _ = load(tmp_path, hub.url, OMNI_MODEL_REVISION="v9")
    assert rc == 2
    assert err.startswith(f"revision v9 of repository {REPO} was not found on {hub.url} (HTTP 404")
    assert err.endswith("set spec.model.revision to an existing branch, tag or commit")


def test_an_unreachable_hub_is_transient(tmp_path):
    rc, _, err, log = load(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert rc == 1 and err == log
    assert "could not fetch" in err and "check spec.model.cache.endpoint" in err


def test_revision_by_branch_name_and_by_commit_sha(tmp_path, src):
    v2 = checkpoint(tmp_path / "v2", seed=1)
    with HubStandIn() as hub:
        hub.add(REPO, {"main": src, "v2": v2})
        main_sha, v2_sha = hub.commit(REPO, "main"), hub.commit(REPO, "v2")
        assert main_sha != v2_sha
        rc, _, err, log = load(tmp_path / "a", hub.url, OMNI_MODEL_REVISION="v2")
        assert rc == 0, err
        assert json.loads(log) | {"bytes": 0} == {"commit": v2_sha, "revision": "v2", "files": len(WANTED), "bytes": 0}
        model = tmp_path / "a" / "weights" / "model"
        assert (model / SHARDS[0]).read_bytes() == (v2 / SHARDS[0]).read_bytes() != (src / SHARDS[0]).read_bytes()
        rc, _, err, log = load(tmp_path / "b", hub.url, OMNI_MODEL_REVISION=main_sha)
        assert rc == 0, err
        assert (json.loads(log)["commit"], json.loads(log)["revision"]) == (main_sha, main_sha)
        assert (tmp_path / "b" / "weights" / "model" / SHARDS[0]).read_bytes() == (src / SHARDS[0]).read_bytes()


def test_a_corrupted_download_fails_verification_and_is_deleted(tmp_path, hub, src):
    good = (src / SHARDS[1]).read_bytes()
    (src / SHARDS[1]).write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))  # same size, other sha256
    rc, _, err, log = load(tmp_path, hub.url)
    assert rc == 1 and err == log
    assert err.startswith(f"{SHARDS[1]} of {REPO}@{hub.commit(REPO)[:12]} failed verification (its sha256 is")
    assert not (tmp_path / "weights" / "model").exists()
    assert not (tmp_path / "weights" / ".partial" / SHARDS[1]).exists()
    (src / SHARDS[1]).write_bytes(good)  # the hub serves the right bytes again: the retry succeeds
    assert load(tmp_path, hub.url)[0] == 0


def test_configuration_error_is_permanent(tmp_path, hub):
    rc, _, err, log = load(tmp_path, hub.url, OMNI_MODEL="")
    assert rc == 2 and err == log
    assert err.startswith("configuration error: OMNI_MODEL is required (the repository to fetch")


# ---- in process: injected free space, index references, gauges

def test_too_small_a_volume_fails_before_fetching_weights(tmp_path, hub, online):
    with pytest.raises(LoaderError) as e:
        wl.fetch(in_process_cfg(tmp_path, hub.url), free_bytes=lambda _: 50_000)
    assert e.value.code == 2
    assert e.value.sentence.startswith("the volume has 50.0 kB free but the checkpoint needs 98.")
    assert e.value.sentence.endswith("more: raise spec.model.cache.size")
    assert not any(n.endswith(".safetensors") for n in hub.downloads)


def test_shards_in_a_subfolder_are_fetched_when_the_index_names_them(tmp_path, online):
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    write_placeholder_checkpoint(tmp_path / "shard")
    (src / "weights" / "shard.safetensors").write_bytes((tmp_path / "shard" / "model.safetensors").read_bytes())
    (src / "weights" / "unused.safetensors").write_bytes(b"\0" * 8)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "weights/shard.safetensors"}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with HubStandIn() as hub:
        hub.add(REPO, {"main": src})
        hub.add("Qwen/Broken", {"main": broken})
        manifest = wl.fetch(in_process_cfg(tmp_path / "a", hub.url))
        assert [f["name"] for f in manifest["files"]] == ["config.json", "model.safetensors.index.json",
                                                          "weights/shard.safetensors"]
        assert (tmp_path / "a" / "weights" / "model" / "weights" / "shard.safetensors").is_file()
        with pytest.raises(LoaderError) as e:
            wl.fetch(in_process_cfg(tmp_path / "b", hub.url, OMNI_MODEL="Qwen/Broken"))
        assert e.value.code == 2 and "names gone.safetensors, which the repository does not have" in e.value.sentence


def test_a_volume_holding_another_model_is_refused(tmp_path, hub, online):
    wl.fetch(in_process_cfg(tmp_path, hub.url))
    with pytest.raises(LoaderError) as e:
        wl.fetch(in_process_cfg(tmp_path, hub.url, OMNI_MODEL_REVISION="v2"))
    assert e.value.code == 2 and f"already holds {REPO}@main, not {REPO}@v2" in e.value.sentence


def test_gauges_end_at_the_totals(tmp_path, hub, src, online):
    progress = wl.Progress()
    wl.fetch(in_process_cfg(tmp_path, hub.url), progress=progress)
    progress.close()
    value = lambda name: progress.registry.get_sample_value(name)  # noqa: E731
    total = sum((src / n).stat().st_size for n in WANTED)
    assert value("omni_weights_bytes_total") == value("omni_weights_bytes_done") == total
    assert value("omni_weights_files_total") == value("omni_weights_files_done") == len(WANTED)


def test_bytes_done_counts_downloads_in_flight(tmp_path):
    progress = wl.Progress()
    progress.plan([RemoteFile("a.safetensors", 1000, None, None), RemoteFile("b.safetensors", 500, None, None)])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "abc.def.incomplete").write_bytes(b"\0" * 300)
    progress.watch(tmp_path, interval=0.05)
    try:
        deadline = time.monotonic() + 5
        while progress.registry.get_sample_value("omni_weights_bytes_done") != 300:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        progress.finished(RemoteFile("b.safetensors", 500, None, None))
        assert progress.registry.get_sample_value("omni_weights_bytes_done") == 800
        (tmp_path / "x" / "abc.def.incomplete").unlink()  # moved into place before it is counted as finished
        progress.refresh()
        assert progress.registry.get_sample_value("omni_weights_bytes_done") == 800  # never goes down
    finally:
        progress.close()


def test_the_progress_endpoint_serves_the_gauges_while_a_download_runs(tmp_path, hub, src):
    hub.chunk_delay, hub.chunk_size = 0.05, 4096  # ~0.4 s per shard
    port = free_port()
    proc = start_loader(tmp_path, hub.url, OMNI_HOST="127.0.0.1", OMNI_METRICS_PORT=str(port))
    samples = []
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                samples.append(parse_prometheus_text(r.read().decode()))
        except OSError:
            pass  # not listening yet, or already gone
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()
    total = sum((src / n).stat().st_size for n in WANTED)
    planned = [s for s in samples if s.get("omni_weights_files_total") == len(WANTED)]
    assert planned and all(s["omni_weights_bytes_total"] == total for s in planned)
    done = [s["omni_weights_bytes_done"] for s in planned]
    assert done == sorted(done)
    assert any(0 < s["omni_weights_files_done"] < len(WANTED) for s in planned)
    assert any(0 < d < total for d in done)


# ---- pure parts

def test_file_selection_keeps_what_the_runtime_loads():
    names = ["config.json", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "tokenizer.model", "qwen.tiktoken", "model-00002-of-00002.safetensors",
             "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "model.pt", "weights.pth", "tf_model.h5", "flax_model.msgpack", "model.onnx",
             "model.gguf", "README.md", ".gitattributes", "LICENSE", "onnx/model.onnx", "sub/extra.json",
             "sub/model-00001.safetensors"]
    files = [RemoteFile(n, 1, None, None) for n in names]
    chosen = [f.name for f in select_files(files)]
    assert chosen == ["chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
                      "model.safetensors.index.json", "qwen.tiktoken", "tokenizer.json", "tokenizer.model",
                      "vocab.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    with_ref = [f.name for f in select_files(files, {"sub/model-00001.safetensors"})]
    assert with_ref == chosen + ["sub/model-00001.safetensors"]


def test_space_check_in_numbers():
    assert space_problem(1_200_000_000, 70_500_000_000) == (
        "the volume has 1.2 GB free but the checkpoint needs 70.5 GB more: raise spec.model.cache.size")
    assert space_problem(10, 10) is None
    assert space_problem(0, 0) is None


def test_only_process_unique_partial_downloads_are_stale():
    assert is_stale_incomplete("q9H_lTBxj0Rk2x-0nHcHYyZ8rBE=.0123abcd.1f2e3d4c.incomplete")
    assert not is_stale_incomplete("q9H_lTBxj0Rk2x-0nHcHYyZ8rBE=.0123abcd.incomplete")  # resumable (older releases)


def test_a_full_or_unwritable_volume_is_permanent():
    # Neither can be provoked here (no small filesystem to mount; the tests run as root, which ignores
    # file modes), so these are the exceptions the OS raises, built by hand.
    err = explain(OSError(errno.ENOSPC, "No space left on device"), repo=REPO, revision="main", endpoint=None,
                  token_given=False, doing=f"while downloading {SHARDS[0]}")
    assert err.code == 2
    assert err.sentence == f"the volume ran out of space while downloading {SHARDS[0]}: raise spec.model.cache.size"
    err = explain(PermissionError(errno.EACCES, "Permission denied", "/weights/.lock"), repo=REPO, revision="main",
                  endpoint=None, token_given=False)
    assert err.code == 2 and err.sentence.startswith("the loader may not write to the weights volume")


def test_the_stand_in_serves_byte_ranges_to_a_resuming_client(tmp_path, hub, src, online):
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get

    meta = get_hf_file_metadata(hf_hub_url(REPO, SHARDS[0], revision=hub.commit(REPO), endpoint=hub.url))
    data = (src / SHARDS[0]).read_bytes()
    assert (meta.etag, meta.size) == (hashlib.sha256(data).hexdigest(), len(data))
    with open(tmp_path / "part", "wb") as fh:
        fh.write(data[:1000])
        http_get(meta.location, fh, resume_size=1000, expected_size=len(data))
    assert (tmp_path / "part").read_bytes() == data
    # and it was a partial answer (a 200 with the whole file would also end in the same bytes)
    with urllib.request.urlopen(urllib.request.Request(meta.location, headers={"Range": "bytes=1000-"})) as r:
        assert (r.status, r.headers["Content-Range"], r.read()) == (206, f"bytes 1000-{len(data) - 1}/{len(data)}",
                                                                    data[1000:])

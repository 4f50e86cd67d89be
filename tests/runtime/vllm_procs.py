"""Real vLLM thinkers for the runtime tests: `omni-runtime thinker --engine vllm` run from
.venv-vllm (vLLM's CPU build), serving the tiny random-weight checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from e2e.procs import descendants, free_port, lower_session_group
from e2e.runtime_process import RuntimeProcess, vllm_launcher_env, vllm_venv

REPO = Path(__file__).resolve().parents[2]
SERVED = "tiny-omni"
START_TIMEOUT = 600.0


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def find_vllm_venv() -> Path:
    venv = vllm_venv()
    if not (venv / "bin" / "vllm").exists():
        pytest.fail(f"vLLM's CPU build is missing ({venv}/bin/vllm): `make setup-vllm` installs it "
                    "(`make test` does it first)")
    return venv


class VllmThinker(RuntimeProcess):
    """A launcher over a real `vllm serve`; `loading_samples` are the launcher's metrics seen
    while vLLM was still starting."""

    loading_samples: list

    def stop(self) -> None:
        # The launcher runs vLLM in its own process group; never leave it behind.
        groups = set()
        for pid in descendants(self.popen.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        self.terminate()
        try:
            self.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        for g in groups:
            try:
                os.killpg(g, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._fh.close()

    def vllm_metrics(self, timeout: float = 5) -> dict[str, float]:
        from omni_runtime.metrics import parse_prometheus_text

        with urllib.request.urlopen(self.url + "/metrics", timeout=timeout) as r:
            return parse_prometheus_text(r.read().decode())

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "VllmThinker":
        self.loading_samples = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"thinker exited with {self.popen.returncode}:\n{self.log_text()}")
            try:
                m = self.metrics()
            except OSError:
                m = None
            if m is not None and m.get("omni_ready") == 1.0:
                self.started_s = time.monotonic() - self.t0
                return self
            if m is not None and len(self.loading_samples) < 50:
                self.loading_samples.append(m)
            time.sleep(0.5)
        raise TimeoutError(f"vLLM thinker not ready after {timeout}s:\n{self.log_text()}")


class VllmPool:
    """Starts launchers in the background so several load at once, hands out ready ones.
    `get` shares a thinker between tests; `take` hands it over for good (e.g. to SIGTERM it)."""

    def __init__(self, logs: Path, model: Path, venv: Path):
        self.logs, self.model, self.venv = logs, model, venv
        self.procs: dict[str, VllmThinker] = {}
        self.all: list[VllmThinker] = []

    def start(self, name: str, max_num_seqs: int = 2, max_model_len: int = 1024, drain_seconds: float = 60,
              eager: bool = False, extra_env: dict | None = None) -> VllmThinker:
        """Start (in the background) the launcher called `name` unless it runs already.
        `eager` skips torch.compile (about a minute less to start on 2 cores)."""
        if name in self.procs and self.procs[name].popen.poll() is None:
            return self.procs[name]
        args = ["--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs)]
        args += ["--enforce-eager"] if eager else []
        env = {
            "OMNI_PORT": str(free_port()), "OMNI_METRICS_PORT": str(free_port()),
            "OMNI_MODEL": str(self.model), "OMNI_SERVED_MODEL_NAME": SERVED,
            "OMNI_DRAIN_SECONDS": str(drain_seconds), **vllm_launcher_env(self.venv, args),
            **(extra_env or {}),
        }
        p = VllmThinker("thinker", env, self.logs / f"{name}-{len(self.all)}.log", python=str(self.venv / "bin" / "python"))
        p.t0 = time.monotonic()
        lower_session_group(p.popen)  # the launcher starts vLLM in a session of its own
        self.procs[name] = p
        self.all.append(p)
        return p

    def get(self, name: str = "shared", **opts) -> VllmThinker:
        p = self.start(name, **opts)
        return p if getattr(p, "started_s", None) else p.wait_ready()

    def take(self, name: str = "shared", **opts) -> VllmThinker:
        p = self.get(name, **opts)
        del self.procs[name]
        return p

    def stop_all(self) -> None:
        for p in self.all:
            p.stop()


def start_speech_stack(thinker: VllmThinker, model: Path, spawn, generation: dict) -> dict:
    """A gateway in front of `thinker` and, through a recording proxy (`tap`), a real talker."""
    from .test_gateway_mm_states import TalkerTap

    common = {"OMNI_MODEL": str(model), "OMNI_DEVICE": "cpu", "OMNI_SERVED_MODEL_NAME": SERVED}
    talker = spawn("talker", common)
    tap = TalkerTap(talker.url)
    gw = spawn("gateway", {
        **common, "OMNI_TALKER_GENERATION": json.dumps(generation), "OMNI_SCRAPE_SECONDS": "0",
        "OMNI_THINKER_SERVICE": f"127.0.0.1:{thinker.port}|{thinker.metrics_port}",
        "OMNI_TALKER_SERVICE": f"127.0.0.1:{tap.port}|{talker.metrics_port}"})
    talker.wait_ready()
    gw.wait_ready()
    return {"gw": gw, "tap": tap, "talker": talker}

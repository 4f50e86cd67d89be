"""Fixtures for the runtime tier: a tiny random-weight Qwen3-Omni built locally, and
real runtime processes (`omni-runtime thinker|talker|gateway`) on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    # torch and transformers come with the `runtime` extra (`make test` installs it): fail, never skip.
    from omni_runtime.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-omni") / "model")


class Proc:
    """One `omni-runtime <role>` process with its ports and log."""

    def __init__(self, role: str, env: dict, log: Path, args=(), python: str | None = None):
        self.role = role
        self.port = int(env["OMNI_PORT"])
        self.metrics_port = int(env["OMNI_METRICS_PORT"])
        self.log = log
        full_env = {**os.environ, **env, "OMNI_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1", "OMNI_LOG_LEVEL": "INFO"}
        self._fh = open(log, "wb")
        self.popen = subprocess.Popen([python or sys.executable, "-m", "omni_runtime.cli", role, *args], env=full_env,
                                      stdout=self._fh, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90.0) -> "Proc":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.role} exited with {self.popen.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.role} not ready after {timeout}s:\n{self.log_text()}")

    def metrics(self) -> dict[str, float]:
        from omni_runtime.metrics import parse_prometheus_text

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return parse_prometheus_text(r.read().decode())

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._fh.close()


@pytest.fixture
def spawn(tmp_path):
    """spawn(role, **env) -> Proc; every process is stopped at the end of the test."""
    procs: list[Proc] = []

    def _spawn(role: str, env: dict, args=(), log_name: str | None = None) -> Proc:
        env = {"OMNI_PORT": str(free_port()), "OMNI_METRICS_PORT": str(free_port()), **env}
        p = Proc(role, env, tmp_path / (log_name or f"{role}-{len(procs)}.log"), args)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def module_spawn(tmp_path_factory):
    procs: list[Proc] = []
    d = tmp_path_factory.mktemp("procs")

    def _spawn(role: str, env: dict, args=()) -> Proc:
        env = {"OMNI_PORT": str(free_port()), "OMNI_METRICS_PORT": str(free_port()), **env}
        p = Proc(role, env, d / f"{role}-{len(procs)}.log", args)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.stop()


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    """vLLM's CPU build (`make setup-vllm`, which `make test` runs): fail, never skip."""
    from .vllm_procs import find_vllm_venv

    return find_vllm_venv()


@pytest.fixture(scope="session")
def vllm_thinkers(tmp_path_factory, tiny_model, vllm_venv):
    """Real `omni-runtime thinker --engine vllm` launchers over `vllm serve` of the tiny model,
    shared by the session (each takes 1-3 minutes to start on 2 cores)."""
    from .vllm_procs import VllmPool

    pool = VllmPool(tmp_path_factory.mktemp("vllm"), tiny_model, vllm_venv)
    yield pool
    pool.stop_all()

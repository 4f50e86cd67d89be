"""One `omni-runtime <role>` process (thinker, talker, gateway) on loopback, with its
ports and log: what the runtime tests and the benchmarks start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from omni_runtime.config import Env

from .procs import free_ports

REPO = Path(__file__).resolve().parents[1]


def vllm_venv() -> Path:
    """Where vLLM's CPU build is installed (`make setup-vllm`): OMNI_VLLM_VENV or .venv-vllm."""
    return Path(os.environ.get("OMNI_VLLM_VENV") or REPO / ".venv-vllm")


def vllm_launcher_env(venv: Path, vllm_args: list[str]) -> dict[str, str]:
    """The environment of `omni-runtime thinker` over `vllm serve` from `venv`: fp32 (the CPU
    kernels' reference precision), 1 GiB of KV cache, `vllm_args` added."""
    return {"OMNI_VLLM_ARGS": json.dumps(["--dtype", "float32", *vllm_args]), "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}


class RuntimeProcess:
    """`env` may name OMNI_PORT / OMNI_METRICS_PORT; free loopback ports are taken otherwise. No
    Service routes to these processes, so nothing has to learn that one stops: they stop without
    a shutdown delay unless `env` sets OMNI_SHUTDOWN_DELAY_SECONDS."""

    def __init__(self, role: str, env: dict, log: Path, args=(), python: str | None = None):
        ports = free_ports(2)
        env = {Env.PORT: str(ports[0]), Env.METRICS_PORT: str(ports[1]), Env.SHUTDOWN_DELAY_SECONDS: "0", **env}
        self.role = role
        self.port = int(env[Env.PORT])
        self.metrics_port = int(env[Env.METRICS_PORT])
        self.log = Path(log)
        full_env = {**os.environ, **env, Env.HOST: "127.0.0.1", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1", Env.LOG_LEVEL: "INFO", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_VERBOSITY": "error"}
        self._fh = open(self.log, "wb")
        self.popen = subprocess.Popen([python or sys.executable, "-m", "omni_runtime.cli", role, *args], env=full_env,
                                      stdout=self._fh, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90.0) -> "RuntimeProcess":
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

    def metrics_text(self, timeout: float = 5) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=timeout) as r:
            return r.read().decode()

    def metrics(self, timeout: float = 5) -> dict[str, float]:
        from omni_runtime.metrics import parse_prometheus_text

        return parse_prometheus_text(self.metrics_text(timeout))

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

"""Run the real operator (`omni-operator run`) as a local process against a LocalCluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from e2e.cluster import LocalCluster

from .procs import free_port

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "omnideployment.yaml"


def install_crd(cluster: LocalCluster, timeout: float = 60.0) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    # `kubectl wait` fails at once while the new CRD has no status yet, so poll the condition.
    cluster.wait_for("the OmniDeployment CRD to be established", lambda: cluster.kubectl(
        "get", "crd/omnideployments.omni.qwen.ai", "-o",
        'jsonpath={.status.conditions[?(@.type=="Established")].status}', check=False).stdout == "True",
        timeout=timeout)


class OperatorProcess:
    """`omni-operator run` with its own health/metrics ports and a log file."""

    def __init__(self, cluster: LocalCluster, log_file: Path, *extra_args: str):
        self.cluster = cluster
        self.log_file = log_file
        self.extra_args = extra_args
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "OperatorProcess":
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        cmd = [sys.executable, "-m", "omni_operator.cli", "run", "--health-port", str(self.health_port),
               "--metrics-port", str(self.metrics_port), *self.extra_args]
        # MALLOC_ARENA_MAX as the operator image sets it: glibc's per-thread arenas would
        # otherwise keep freed watch payloads of the worker threads resident.
        env = dict(self.cluster.env, PYTHONUNBUFFERED="1", MALLOC_ARENA_MAX="2")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"operator not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def _probe(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def healthy(self) -> bool:
        return self._probe("/healthz")

    def ready(self) -> bool:
        """Holds the leader lease (when electing) and its watches run."""
        return self._probe("/readyz")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: what a node failure or OOM does; no clean shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

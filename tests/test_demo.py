"""`make demo` (python -m e2e.demo), run for real in a private state dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.cluster import LocalCluster
from e2e.demo import OPERATOR_PID_FILE, _operator_pid_alive

from .helpers import ROOT

pytestmark = pytest.mark.cluster


def demo(state_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e2e.demo", "--state-dir", str(state_dir), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def processes_using(state_dir: Path) -> list[str]:
    """Live processes whose command line or environment names the state dir."""
    needle = str(state_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and (needle in cmdline or needle in environ):
            argv = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {argv[:200]}")
    return found


def _assert_converged(out: str) -> None:
    assert "is Ready after" in out
    assert "SizingValid  True" in out
    # Each role's pod on its own node pool.
    pods = [line.split() for line in out.split("Pods:", 1)[1].splitlines() if line.startswith("qwen3-omni-")]
    roles = {cols[1]: cols[5] for cols in pods}
    # The weight loader ran (for real, on the cpu pool) before any GPU pod.
    assert roles == {"thinker": "thinker", "talker": "talker", "gateway": "cpu", "weights": "cpu"}, out
    assert {cols[1]: cols[3] for cols in pods}["weights"] == "Succeeded", out
    assert re.search(r"Weights: Complete, commit [0-9a-f]{12}", out), out


def test_demo_converges_and_leaves_nothing_running(tmp_path):
    state_dir = tmp_path / "state"
    try:
        result = demo(state_dir, "--timeout", "240")
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-6000:]
        _assert_converged(result.stdout)
        assert "helm upgrade --install qwen3-omni" in out
        assert (state_dir / "logs" / "operator.log").stat().st_size > 0
        assert not processes_using(state_dir)
        assert not (state_dir / OPERATOR_PID_FILE).exists()
    finally:
        demo(state_dir, "--down", timeout=120)


def test_demo_fails_fast_with_the_operator_log_when_the_spec_cannot_be_sized(tmp_path):
    state_dir = tmp_path / "state"
    example = tmp_path / "too-small.yaml"
    example.write_text(
        "apiVersion: omni.qwen.ai/v1alpha1\nkind: OmniDeployment\nmetadata: {name: too-small, namespace: default}\n"
        "spec:\n  variant: Thinking\n  workload: {maxVideoSeconds: 120}\n"
        "  thinker: {gpu: {memoryGiB: 24, countPerNode: 1}}\n")
    try:
        result = demo(state_dir, "--example", str(example), "--timeout", "240")
        assert result.returncode == 1, result.stdout[-4000:]
        assert "DEMO FAILED: default/too-small cannot be sized" in result.stdout
        assert "--- last lines of" in result.stdout and "operator.log" in result.stdout
        assert not processes_using(state_dir)
    finally:
        demo(state_dir, "--down", timeout=120)


def test_demo_keep_leaves_a_usable_cluster_until_down(tmp_path):
    state_dir = tmp_path / "state"
    try:
        result = demo(state_dir, "--keep", "--timeout", "240")
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        _assert_converged(result.stdout)
        assert f"eval $(python -m e2e.cluster env --state-dir {state_dir.resolve()})" in result.stdout
        cluster = LocalCluster(state_dir)
        assert cluster.is_running()
        pid = int((state_dir / OPERATOR_PID_FILE).read_text())
        assert _operator_pid_alive(pid)
        # The operator still reconciles: a change to the spec reaches the StatefulSet.
        cluster.kubectl("patch", "omnideployment", "qwen3-omni", "-n", "default", "--type=merge",
                        "-p", '{"spec":{"thinker":{"minReplicas":2}}}')
        cluster.wait_for("the thinker StatefulSet to have 2 replicas",
                         lambda: cluster.get_json("statefulset", "qwen3-omni-thinker", "-n", "default")
                         ["spec"]["replicas"] == 2, timeout=60)
        # A second run reuses the running cluster and replaces the kept operator.
        again = demo(state_dir, "--keep", "--timeout", "240")
        assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
        assert "reusing" in again.stderr or "reusing" in again.stdout
        assert "stopped the operator a previous --keep run left running" in again.stdout
        assert not _operator_pid_alive(pid)
    finally:
        down = demo(state_dir, "--down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not processes_using(state_dir)

"""`make demo` (python -m e2e.demo), run for real in a private state dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from e2e.cluster import LocalCluster
from e2e.demo import OPERATOR_PID_FILE, _operator_pid_alive
from e2e.demo_serving import SPOKEN_TRIES

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


def _assert_answered(out: str, answer: Path) -> str:
    """The spoken answer is a real WAV; returns the gateway URL the demo printed."""
    with wave.open(str(answer)) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getnframes() > 0
    assert f"speech:     {answer}" in out, out[-3000:]
    url = re.search(r"^curl -s (http://127\.[0-9.]+:8080)/v1/chat/completions", out, re.M)
    assert url, out[-3000:]
    return url.group(1)


@pytest.mark.runtime
def test_demo_answers_scales_under_load_and_leaves_nothing_running(tmp_path):
    state_dir = tmp_path / "state"
    answer = tmp_path / "answer.wav"
    try:
        result = demo(state_dir, "--timeout", "240", "--answer", str(answer), "--load", "--load-seconds", "40")
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-6000:]
        _assert_converged(result.stdout)
        _assert_answered(result.stdout, answer)
        assert "helm upgrade --install qwen3-omni" in out
        # The load table: the autoscaler's decisions as they happened, up and back down.
        decisions = re.findall(r"^ +thinker (\d+) -> (\d+): (.*)$", result.stdout, re.M)
        assert any(int(b) > int(a) and "load" in why for a, b, why in decisions), result.stdout[-4000:]
        assert any(int(b) < int(a) for a, b, _ in decisions), result.stdout[-4000:]
        summary = re.search(r"^load: (\d+) answered, (\d+) failed; thinker replicas peaked at (\d+), ended at 1",
                            result.stdout, re.M)
        assert summary and int(summary.group(1)) > 0 and int(summary.group(2)) == 0 and int(summary.group(3)) > 1
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
        result = demo(state_dir, "--example", str(example), "--timeout", "240", "--no-serve")
        assert result.returncode == 1, result.stdout[-4000:]
        assert "DEMO FAILED: default/too-small cannot be sized" in result.stdout
        assert "--- last lines of" in result.stdout and "operator.log" in result.stdout
        assert not processes_using(state_dir)
    finally:
        demo(state_dir, "--down", timeout=120)


@pytest.mark.runtime
def test_demo_keep_leaves_a_usable_cluster_until_down(tmp_path):
    state_dir = tmp_path / "state"
    answer = tmp_path / "answer.wav"
    try:
        result = demo(state_dir, "--keep", "--timeout", "240", "--answer", str(answer))
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        _assert_converged(result.stdout)
        # The printed way to ask again works while the demo is kept: the pods still serve.
        url = _assert_answered(result.stdout, answer)
        again_dir = tmp_path / "again"
        again_dir.mkdir()
        command = re.search(r"^(curl -s .*\n.*)$", result.stdout, re.M).group(1)
        assert url in command
        # The random talker may end its speech at its first step (about one answer in twenty), so
        # the command is run up to three times for a spoken answer; a talker that never speaks fails.
        for _ in range(SPOKEN_TRIES):
            asked = subprocess.run(["bash", "-c", command], cwd=again_dir, capture_output=True, text=True,
                                   timeout=120)
            assert asked.returncode == 0 and asked.stdout.strip(), asked.stderr  # the transcript
            with wave.open(str(again_dir / "answer.wav")) as w:
                if w.getnframes() > 0:
                    break
        else:
            raise AssertionError(f"no speech in {SPOKEN_TRIES} answers to the printed command")
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


@pytest.mark.runtime
def test_demo_names_the_pod_whose_process_keeps_failing_with_its_log(tmp_path):
    """Weights on an empty PVC of your own: the thinker's process cannot load them and exits; the
    pod restarts (CrashLoopBackOff) and the demo stops early, naming the pod with its log tail."""
    state_dir = tmp_path / "state"
    example = tmp_path / "empty-weights.yaml"
    example.write_text(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: empty-weights, namespace: default}\n"
        "spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n---\n"
        "apiVersion: omni.qwen.ai/v1alpha1\nkind: OmniDeployment\nmetadata: {name: empty, namespace: default}\n"
        "spec:\n  variant: Thinking\n  model: {pvc: {claimName: empty-weights}}\n"
        "  thinker:\n    gpu: {memoryGiB: 80, countPerNode: 8}\n"
        "    nodePool: {nodeSelector: {omni.qwen.ai/pool: thinker}}\n"
        "  gateway:\n    nodePool: {nodeSelector: {omni.qwen.ai/pool: cpu}}\n")
    try:
        result = demo(state_dir, "--example", str(example), "--timeout", "240")
        out = result.stdout
        assert result.returncode == 1, out[-4000:]
        assert "DEMO FAILED: the process of pod empty-thinker-0 keeps exiting" in out, out[-4000:]
        assert re.search(r"^--- pod empty-thinker-0 \(CrashLoopBackOff, last exit 1\); its process's log \S+/thinker\.log:",
                         out, re.M), out[-4000:]
        assert "thinker failed to load" in out and "model.safetensors" in out
    finally:
        demo(state_dir, "--down", timeout=120)
    assert not processes_using(state_dir)

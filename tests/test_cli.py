"""The `omni-operator` command line, run as a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from .helpers import EXAMPLES, ROOT

REQUIRED_KEYS = {"role", "variant", "videoSeconds", "estimatedGB", "gpuMemoryGiB", "gpusPerReplica",
                 "tensorParallelSize", "fits", "reason", "vllmArgs"}


def cli(*args, stdin=None):
    exe = shutil.which("omni-operator") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "omni_operator.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=stdin, cwd=ROOT)


def test_size_json_fits():
    r = cli("size", "--role", "thinker", "--variant", "instruct", "--video-seconds", "15",
            "--gpu-memory-gib", "80", "--output", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert REQUIRED_KEYS <= out.keys()
    assert (out["estimatedGB"], out["gpusPerReplica"], out["tensorParallelSize"], out["fits"]) == (68.74, 1, 1, True)
    assert "--tensor-parallel-size" in out["vllmArgs"]


def test_size_combined_uses_the_instruct_row():
    r = cli("size", "--role", "combined", "--variant", "instruct", "--video-seconds", "15",
            "--gpu-memory-gib", "80", "--output", "json")
    assert json.loads(r.stdout)["estimatedGB"] == 78.85


def test_size_that_does_not_fit_exits_2_with_the_numbers():
    r = cli("size", "--role", "thinker", "--variant", "thinking", "--video-seconds", "120",
            "--gpu-memory-gib", "24", "--gpus-per-node", "4", "--output", "json")
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert out["fits"] is False and "131.65 GB" in out["reason"] and "4 x 24 GiB" in out["reason"]


def test_size_text_output_is_human_readable():
    r = cli("size", "--role", "talker", "--video-seconds", "30", "--gpu-memory-gib", "24")
    assert r.returncode == 0 and "10.73 GB estimated -> fits" in r.stdout


def test_size_rejects_impossible_input():
    r = cli("size", "--role", "talker", "--variant", "thinking", "--gpu-memory-gib", "24")
    assert r.returncode == 2 and "no talker" in r.stderr


def test_render_prints_the_objects():
    r = cli("render", "-f", str(EXAMPLES / "omni.yaml"))
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout)]
    assert kinds.count("StatefulSet") == 2 and "Deployment" in kinds


@pytest.mark.parametrize("doc,code,message", [
    ({"apiVersion": "omni.qwen.ai/v1alpha1", "kind": "OmniDeployment", "metadata": {"name": "x"},
      "spec": {"thinker": {"minReplicas": 3, "maxReplicas": 1}}}, 2, "minReplicas (3) must not exceed"),
    ({"apiVersion": "omni.qwen.ai/v1alpha1", "kind": "OmniDeployment", "metadata": {"name": "Bad_Name"},
      "spec": {}}, 2, "DNS-1035"),
    ({"apiVersion": "omni.qwen.ai/v1alpha1", "kind": "OmniDeployment", "metadata": {"name": "small"},
      "spec": {"thinker": {"gpu": {"memoryGiB": 16, "countPerNode": 2}}}}, 2, "68.74 GB"),
    ({"kind": "ConfigMap"}, 2, "no OmniDeployment"),
])
def test_render_refuses_bad_resources(doc, code, message):
    r = cli("render", "-f", "-", stdin=yaml.safe_dump(doc))
    assert r.returncode == code
    assert message in r.stderr
    assert r.stdout == ""

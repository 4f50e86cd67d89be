"""The `omni-operator` command line, run as a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from .helpers import EXAMPLES, ROOT

pytestmark = pytest.mark.pure

REQUIRED_KEYS = {"role", "variant", "videoSeconds", "estimatedGB", "gpuMemoryGiB", "gpusPerReplica",
                 "tensorParallelSize", "fits", "reason", "vllmArgs"}


def cli(*args, stdin=None):
    exe = shutil.which("omni-operator") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "omni_operator.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=stdin, cwd=ROOT)


def test_size_json_fits():
    r = cli("size", "--role", "thinker", "--variant", "instruct", "--video-seconds", "15",
            "--gpu-memory-gib", "80", "--max-num-seqs", "1", "--output", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert REQUIRED_KEYS <= out.keys()
    assert (out["estimatedGB"], out["gpusPerReplica"], out["tensorParallelSize"], out["fits"]) == (68.74, 1, 1, True)
    assert "--tensor-parallel-size" in out["vllmArgs"]


def test_size_counts_the_kv_cache_of_the_concurrent_sequences():
    """The issue's example: Thinking, 15 s video (17408 tokens), 8 sequences on 80 GiB GPUs."""
    args = ("size", "--role", "thinker", "--variant", "thinking", "--video-seconds", "15",
            "--gpu-memory-gib", "80", "--max-num-seqs", "8", "--output", "json")
    out = json.loads(cli(*args).stdout)
    assert (out["tableGB"], out["contextTokens"], out["concurrentSequences"]) == (68.74, 17408, 8)
    assert out["kvCacheBytesPerToken"] == 2 * 48 * 4 * 128 * 2
    assert out["concurrentKvTokens"] == 7 * 17408
    assert (out["concurrentKvGB"], out["estimatedGB"]) == (11.98, 80.72)
    assert (out["fits"], out["gpusPerReplica"]) == (True, 2)
    vllm = dict(zip(out["vllmArgs"][::2], out["vllmArgs"][1::2]))
    assert vllm["--max-num-seqs"] == "8" and vllm["--max-model-len"] == "17408"
    assert int(vllm["--kv-cache-memory-bytes"]) == out["kvCacheBytesPerGPU"] == 8 * 17408 * 2 * 48 * 2 * 128 * 2
    r = cli(*args[:-2], "--gpus-per-node", "1")
    assert r.returncode == 2
    assert "80.72 GB estimated -> does not fit" in r.stdout
    assert "fits 6 concurrent sequences at this context on 1 x 80 GiB; asked for 8" in r.stdout
    assert "121856 tokens x 96 KiB per token -> 11.98 GB" in r.stdout


def test_size_reads_the_architecture_from_a_model_config(tmp_path):
    config = {"dtype": "bfloat16", "thinker_config": {"text_config": {
        "num_hidden_layers": 96, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    base = ("size", "--role", "thinker", "--variant", "thinking", "--video-seconds", "15", "--gpu-memory-gib", "141",
            "--output", "json")
    default = json.loads(cli(*base).stdout)
    for path in (tmp_path / "config.json", tmp_path):  # the file, or the checkpoint directory
        out = json.loads(cli(*base, "--model-config", str(path)).stdout)
        assert out["kvCacheBytesPerToken"] == 2 * 96 * 8 * 128 * 2 == 4 * default["kvCacheBytesPerToken"]
        assert out["estimatedGB"] > default["estimatedGB"]
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "llama"}))
    r = cli(*base, "--model-config", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "thinker_config.text_config" in r.stderr
    r = cli(*base, "--model-config", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read the model config" in r.stderr


def test_size_combined_uses_the_instruct_row():
    r = cli("size", "--role", "combined", "--variant", "instruct", "--video-seconds", "15",
            "--gpu-memory-gib", "80", "--output", "json")
    out = json.loads(r.stdout)
    assert out["tableGB"] == 78.85
    assert out["kvCacheBytesPerToken"] == (48 * 4 + 20 * 2) * 2 * 128 * 2  # thinker and talker in one pod


def test_size_that_does_not_fit_exits_2_with_the_numbers():
    r = cli("size", "--role", "thinker", "--variant", "thinking", "--video-seconds", "120",
            "--gpu-memory-gib", "24", "--gpus-per-node", "4", "--output", "json")
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert out["fits"] is False and "131.65 GB" in out["reason"] and "4 x 24 GiB" in out["reason"]


def test_size_text_output_is_human_readable():
    r = cli("size", "--role", "talker", "--video-seconds", "30", "--gpu-memory-gib", "24", "--max-num-seqs", "1")
    assert r.returncode == 0 and "12.73 GB estimated -> fits" in r.stdout  # the table and the CUDA graphs
    r = cli("size", "--role", "talker", "--video-seconds", "30", "--gpu-memory-gib", "24", "--max-num-seqs", "8")
    assert r.returncode == 0
    assert "8 concurrent sequences x 21504 tokens: 15.81 GB estimated -> fits" in r.stdout
    assert "one request (model card table): 10.73 GB" in r.stdout and "CUDA graphs (estimate): 2.00 GB" in r.stdout
    assert "KV cache of 7 more sequences: 150528 tokens x 20 KiB per token -> 3.08 GB" in r.stdout


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

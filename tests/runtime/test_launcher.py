"""The vLLM launcher's pure parts: command construction, configuration errors, metrics
parsing. Supervision of a real `vllm serve` (readiness, queue depth, drain) is in
test_vllm_thinker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from omni_runtime.config import LauncherSettings
from omni_runtime.metrics import parse_prometheus_text
from omni_runtime.thinker.vllm_launcher import build_vllm_command, node_rank_from_pod_name, vllm_finished, vllm_load

pytestmark = pytest.mark.runtime

SIZING_ARGS = ["--tensor-parallel-size", "4", "--max-model-len", "32768", "--max-num-seqs", "8",
               "--limit-mm-per-prompt", json.dumps({"image": 4, "video": 1, "audio": 4}),
               "--gpu-memory-utilization", "0.9"]
BASE = {"OMNI_ROLE": "thinker", "OMNI_MODEL": "/models/qwen3-omni", "OMNI_SERVED_MODEL_NAME": "qwen3-omni",
        "OMNI_PORT": "8000", "POD_NAME": "demo-thinker-0", "POD_NAMESPACE": "ai"}


def command(environ: dict[str, str]):
    return build_vllm_command(LauncherSettings.from_env(environ))


def cmd(**env):
    return command({**BASE, "OMNI_VLLM_ARGS": json.dumps(SIZING_ARGS), **env})


def test_single_pod():
    argv, facts = cmd()
    assert argv == ["vllm", "serve", "/models/qwen3-omni", "--served-model-name", "qwen3-omni",
                    "--host", "0.0.0.0", "--port", "8000", *SIZING_ARGS]
    assert facts == {"nnodes": 1, "node_rank": 0, "headless": False, "port": 8000, "served_model_name": "qwen3-omni"}
    # the JSON inside an argument survives as one argv element
    assert json.loads(argv[argv.index("--limit-mm-per-prompt") + 1]) == {"image": 4, "video": 1, "audio": 4}


def test_defaults_revision_and_port():
    argv, facts = command({"OMNI_MODEL": "Qwen/Qwen3-Omni-30B-A3B-Instruct", "OMNI_MODEL_REVISION": "abc123",
                           "OMNI_PORT": "9000"})
    assert argv[:3] == ["vllm", "serve", "Qwen/Qwen3-Omni-30B-A3B-Instruct"]
    assert argv[argv.index("--served-model-name") + 1] == "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    assert argv[argv.index("--revision") + 1] == "abc123"
    assert argv[argv.index("--port") + 1] == "9000" and facts["port"] == 9000
    argv, _ = command({"OMNI_MODEL": "m", "OMNI_VLLM_ARGS": ""})
    assert argv == ["vllm", "serve", "m", "--served-model-name", "m", "--host", "0.0.0.0", "--port", "8000"]


def test_multi_node_rank_zero_serves_the_api():
    argv, facts = cmd(OMNI_NNODES="2", POD_NAME="demo-thinker-r0-0", OMNI_MASTER_ADDR="demo-thinker-r0-0.demo-thinker",
                      OMNI_MASTER_PORT="29600")
    tail = argv[argv.index("--distributed-executor-backend"):]
    assert tail == ["--distributed-executor-backend", "mp", "--nnodes", "2", "--node-rank", "0",
                    "--master-addr", "demo-thinker-r0-0.demo-thinker", "--master-port", "29600"]
    assert "--headless" not in argv and facts["headless"] is False and facts["node_rank"] == 0
    assert argv[argv.index("--port") + 1] == "8000"


@pytest.mark.parametrize("ordinal, nnodes", [(1, 2), (3, 4), (11, 12)])
def test_multi_node_rank_n_is_headless(ordinal, nnodes):
    argv, facts = cmd(OMNI_NNODES=str(nnodes), POD_NAME=f"big-thinker-7-{ordinal}", OMNI_MASTER_ADDR="big-thinker-7-0.svc")
    assert argv[argv.index("--node-rank") + 1] == str(ordinal)
    assert argv[argv.index("--nnodes") + 1] == str(nnodes)
    assert argv[argv.index("--master-port") + 1] == "29501"
    assert argv[-1] == "--headless" and facts["headless"] is True and facts["node_rank"] == ordinal


def test_explicit_mp_backend_is_not_duplicated():
    args = SIZING_ARGS + ["--distributed-executor-backend", "mp"]
    argv, _ = command({**BASE, "OMNI_VLLM_ARGS": json.dumps(args), "OMNI_NNODES": "2",
                       "POD_NAME": "t-1", "OMNI_MASTER_ADDR": "t-0"})
    assert argv.count("--distributed-executor-backend") == 1


@pytest.mark.parametrize("env, needle", [
    ({"OMNI_VLLM_ARGS": "[--tensor-parallel-size 4"}, "not valid JSON"),
    ({"OMNI_VLLM_ARGS": '{"tp": 4}'}, "must be a JSON list"),
    ({"OMNI_VLLM_ARGS": '["--max-num-seqs", {"n": 8}]'}, "item 1 must be a string"),
    ({"OMNI_VLLM_ARGS": '["--enforce-eager", true]'}, "item 1 must be a string"),
    ({"OMNI_VLLM_ARGS": '["--port", "9999"]'}, "must not set --port"),
    ({"OMNI_VLLM_ARGS": '["--served-model-name=x"]'}, "must not set --served-model-name"),
    ({"OMNI_VLLM_ARGS": '["--headless"]'}, "must not set --headless"),
    ({"OMNI_VLLM_ARGS": '["Qwen/other", "--tensor-parallel-size", "2"]'}, "must start with a flag"),
    ({"OMNI_NNODES": "two"}, "OMNI_NNODES='two': Input should be a valid integer"),
    ({"OMNI_NNODES": "0"}, "OMNI_NNODES='0': Input should be greater than or equal to 1"),
    ({"OMNI_NNODES": "2", "POD_NAME": "thinker", "OMNI_MASTER_ADDR": "t-0"}, "no StatefulSet ordinal"),
    ({"OMNI_NNODES": "2", "POD_NAME": "t-0"}, "OMNI_MASTER_ADDR is required"),
    ({"OMNI_NNODES": "2", "POD_NAME": "t-2", "OMNI_MASTER_ADDR": "t-0"}, "outside OMNI_NNODES=2"),
    ({"OMNI_NNODES": "2", "POD_NAME": "t-1", "OMNI_MASTER_ADDR": "t-0", "OMNI_MASTER_PORT": "70000"},
     "OMNI_MASTER_PORT='70000': Input should be less than or equal to 65535"),
    ({"OMNI_NNODES": "2", "POD_NAME": "t-1", "OMNI_MASTER_ADDR": "t-0",
      "OMNI_VLLM_ARGS": '["--distributed-executor-backend", "ray"]'}, "mp backend"),
])
def test_bad_configuration_is_a_clear_error(env, needle):
    with pytest.raises(ValueError) as e:  # LauncherError and ConfigError are ValueErrors
        command({**BASE, **env})
    assert needle in str(e.value)


def test_node_rank_from_the_pod_name():
    assert node_rank_from_pod_name("omni-thinker-r2-5") == 5


def test_cli_reports_bad_args_and_exits_2():
    env = {**os.environ, **BASE, "OMNI_VLLM_ARGS": "not json"}
    r = subprocess.run([sys.executable, "-m", "omni_runtime.cli", "print-vllm-command"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "OMNI_VLLM_ARGS='not json': not valid JSON" in r.stderr


VLLM_EXPOSITION = """# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen3-omni"} 3.0
vllm:num_requests_running{engine="0",model_name="qwen3-omni"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen3-omni"} 0.25
vllm:request_success_total{engine="0",finished_reason="stop",model_name="qwen3-omni"} 5.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="qwen3-omni"} 2.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="qwen3-omni"} 7.0
"""


def test_parse_vllm_metrics():
    m = parse_prometheus_text(VLLM_EXPOSITION)
    assert m["vllm:num_requests_waiting"] == 3.0 and m["vllm:num_requests_running"] == 2.0
    assert vllm_load(m) == (3.0, 2.0) and vllm_load({}) == (0.0, 0.0)
    assert vllm_finished(m) == 7.0 and vllm_finished({}) is None


def test_finished_counter_follows_the_engine_across_a_restart():
    from omni_runtime.metrics import ThinkerMetrics

    metrics = ThinkerMetrics()
    for total in (3.0, 7.0, 2.0, 5.0):  # vLLM restarted after 7
        metrics.finished_to(total)
    assert parse_prometheus_text(metrics.render().decode())["omni_requests_finished_total"] == 12.0


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_headless_rank_answers_every_scrape_of_the_pod_monitor(spawn, tmp_path):
    """Ranks > 0 run no vLLM API server; the PodMonitor still scrapes both `metrics` and `http`
    on every thinker pod, and a 404 there is a target down (TargetDown fires)."""
    import time

    fake = tmp_path / "bin" / "vllm"  # a worker that just lives until it is stopped
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 600\n")
    fake.chmod(0o755)
    t = spawn("thinker", {**BASE, "OMNI_NNODES": "2", "POD_NAME": "demo-thinker-0-1",
                          "OMNI_MASTER_ADDR": "leader.invalid", "OMNI_MM_STATES_DIR": str(tmp_path / "mm"),
                          "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"})
    deadline = time.monotonic() + 60
    while True:
        assert t.popen.poll() is None, t.log_text()
        try:
            if t.metrics().get("omni_ready") == 1.0:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, t.log_text()
        time.sleep(0.2)
    # The launcher's own metrics on the metrics port: alive, nothing queued (rank 0 holds the queue).
    m = t.metrics()
    assert m["omni_queue_depth"] == 0.0 and m["omni_requests_running"] == 0.0 and m["omni_draining"] == 0.0
    # vLLM's metrics endpoint on the http port: up, with no series (they are rank 0's).
    status, body = _get(f"{t.url}/metrics")
    assert status == 200, body
    assert parse_prometheus_text(body) == {}
    assert _get(f"{t.url}/health")[0] == 503  # the leader does not answer
    t.stop()
    assert t.popen.returncode == 0, t.log_text()

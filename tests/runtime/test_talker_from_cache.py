"""Tiers 3 + 4: the real talker process, started for a kwok talker pod with the environment
the operator rendered for it, loads the tiny model from the weight cache that the real loader
filled from a stand-in hub (the public hub is unreachable from tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from e2e.hub import HubStandIn

from ..test_operator_cluster import apply, crd, kget, operator, wait, wait_ready  # noqa: F401
from ..test_weights_cluster import REPO, from_hub

pytestmark = pytest.mark.runtime


def test_the_talker_pod_loads_its_weights_from_the_cache(cluster, namespace, operator, tiny_model, tmp_path):
    """The tiny model on the hub, fetched by the real loader, loaded by the real talker process
    started for the talker pod with the environment the operator rendered for it."""
    with HubStandIn() as server:
        server.add(REPO, {"main": tiny_model})
        apply(cluster, from_hub("speech", namespace, server.url))
        ready = wait_ready(cluster, namespace, "speech", operator)
    claim = ready["status"]["weights"]["claimName"]
    volume = cluster.pvc_host_dir(namespace, claim)
    pod = kget(cluster, "pod", "speech-talker-0", "-n", namespace)
    container = pod["spec"]["containers"][0]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model"]
    assert mount["readOnly"] is True
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # The pod's view of the volume, mapped onto this machine as a kubelet would mount it.
    model_dir = env["OMNI_MODEL"].replace(mount["mountPath"], str(volume), 1)
    assert Path(model_dir, ".omni-weights.json").exists()
    # The root filesystem is read-only: every path the talker writes (HOME, caches, TMPDIR) is in an
    # emptyDir, here a fresh directory each.
    empty_dirs = {v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
    for m in container["volumeMounts"]:
        if m["name"] in empty_dirs:
            host = tmp_path / "volumes" / m["name"]
            host.mkdir(parents=True, exist_ok=True)
            path = m["mountPath"].rstrip("/")
            env.update({k: str(host) + v[len(path):] for k, v in env.items() if v == path or v.startswith(path + "/")})
    env.update(OMNI_MODEL=model_dir, OMNI_HOST=pod["status"]["podIP"], OMNI_DEVICE="cpu", HF_HOME=str(tmp_path),
               OMP_NUM_THREADS="1", PATH=os.environ["PATH"], PYTHONUNBUFFERED="1")
    log = tmp_path / "talker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "omni_runtime.cli", "talker"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://{pod['status']['podIP']}:{env['OMNI_PORT']}"

        def healthy():
            assert proc.poll() is None, log.read_text()[-3000:]
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                return r.status == 200

        wait("the talker to load from the cache", healthy, timeout=180)
        with urllib.request.urlopen(url + "/v1/talker/info", timeout=5) as r:
            info = json.load(r)
        assert info["sample_rate"] > 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()[-3000:]  # SIGTERM drains and exits cleanly

"""The image tier: the operator and gateway images, built with buildah from images/*/Dockerfile,
started the way their pods start them, and probed from outside on loopback.

Each container runs what the operator (or the chart) renders for it: its command and args, env,
user, emptyDir volumes and read-only root (see e2e/image_run.py for how buildah is made to do that).
Only ports are swapped for free ones, since every run shares the host network.

The images tier: `make test-images` (part of `make test`); a plain `pytest` leaves it out, since it
needs root, buildah and mmdebstrap, and minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e import image_run, images
from e2e.hub import HubStandIn, write_placeholder_checkpoint
from e2e.procs import free_ports

pytestmark = pytest.mark.images

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"metadata.name": "smoke-0", "metadata.namespace": "default"}


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    missing = images.missing_tools()
    assert not missing, f"the image tier needs {', '.join(missing)} (`make image-tools`)"
    t0 = time.monotonic()
    refs = images.build_images()
    print(f"images built in {time.monotonic() - t0:.0f}s: {refs}", file=sys.stderr)
    return refs


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    """What the operator renders for examples/omni.yaml, by (kind, name)."""
    out = subprocess.run([sys.executable, "-m", "omni_operator.cli", "render", "-f", str(ROOT / "examples/omni.yaml"),
                          "-o", "json"], capture_output=True, text=True, check=True, cwd=ROOT)
    return {(o["kind"], o["metadata"]["name"]): o for o in json.loads(out.stdout)["items"]}


def pod_of(obj: dict) -> tuple[dict, dict]:
    pod = obj["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def assert_runs_as(container: image_run.Container, program: str, uid: int, gid: int) -> int:
    pid = container.server_pid(program)
    uids, gids = image_run.process_ids(pid)
    assert uid != 0 and uids == [uid] * 4 and gids == [gid] * 4, (uids, gids)
    return pid


@pytest.mark.parametrize("name", images.CI_IMAGES)
def test_image_metadata(built, name):
    config = images.image_config(built[name])
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == images.project_version()
    assert labels["org.opencontainers.image.revision"] == images.git_revision() != "unknown"
    assert labels["org.opencontainers.image.source"] == images.SOURCE
    user = config["User"].split(":")
    assert all(p.isdigit() for p in user) and int(user[0]) != 0, config["User"]  # runAsNonRoot needs a numeric uid
    assert config["Healthcheck"]["Test"], "HEALTHCHECK dropped (an OCI-format build loses it)"
    assert config["Entrypoint"] == [{"operator": "omni-operator", "gateway": "omni-runtime"}[name]]


def test_gateway_serves_as_rendered(built, rendered, tmp_path):
    pod, ctr = pod_of(rendered[("Deployment", "qwen3-omni-gateway")])
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    port, metrics = free_ports(2)
    with image_run.Container(built["gateway"]) as c:
        spec = image_run.pod_run_spec(pod, ctr, images.image_config(built["gateway"]), tmp_path / "volumes", fields=FIELDS,
                                   replace_env={"OMNI_PORT": str(port), "OMNI_METRICS_PORT": str(metrics)})
        c.start(spec, tmp_path / "gateway.log")
        assert json.loads(image_run.wait_http(f"http://127.0.0.1:{port}/health", c))["status"] == "ok"
        pid = assert_runs_as(c, "omni-runtime", spec.uid, spec.gid)
        assert (spec.uid, spec.gid) == (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
        # a real request through the app: no thinker is up, so it answers from its own config
        status, body = image_run.http_get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert status == 200 and json.loads(body)["data"][0]["id"] == spec.env["OMNI_SERVED_MODEL_NAME"]
        status, text = image_run.http_get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and 'omni_ready{role="gateway"} 1.0' in text, text[:2000]
        assert c.terminate(pid) == 0, c.log_tail()
        assert c.writes() == [], "wrote outside its volumes (the pod's root is read-only)"


def test_weight_loader_job_as_rendered(built, rendered, tmp_path):
    """The loader Job runs in the gateway image: fetches a checkpoint from a stand-in hub onto the
    weights volume, as the rendered user, writing nothing else but /tmp."""
    (job,) = [o for (kind, _), o in rendered.items() if kind == "Job"]
    pod, ctr = pod_of(job)
    (metrics,) = free_ports(1)
    checkpoint = write_placeholder_checkpoint(tmp_path / "checkpoint", shards=2)
    with HubStandIn() as hub, image_run.Container(built["gateway"]) as c:
        hub.set_default(checkpoint)
        spec = image_run.pod_run_spec(pod, ctr, images.image_config(built["gateway"]), tmp_path / "volumes",
                                   fields=FIELDS, replace_env={"OMNI_METRICS_PORT": str(metrics)})
        spec.env["HF_ENDPOINT"] = hub.url  # the hub's address: the one thing the rendered spec cannot know
        proc = c.run(spec, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert sorted(hub.downloads) == sorted(p.name for p in checkpoint.iterdir())
        assert c.writes() == [], "wrote outside its volumes (the pod's root is read-only)"
    weights = next(v.host for v in spec.volumes if v.target == spec.env["OMNI_WEIGHTS_DIR"])
    manifest = json.loads((weights / "model" / ".omni-weights.json").read_text())
    assert manifest["repo"] == spec.env["OMNI_MODEL"]
    for f in checkpoint.iterdir():
        copied = weights / "model" / f.name
        assert copied.read_bytes() == f.read_bytes()
        assert copied.stat().st_uid == spec.uid  # written by the pod's user, not root


def test_operator_in_cluster_as_the_chart_installs_it(built, cluster, tmp_path):
    """The chart installed on the local control plane; its operator container run in the image
    with the service-account token the chart's RBAC grants, in-cluster config as in a pod."""
    release, ns = "smoke", "omni-images"
    cluster.helm("install", release, str(ROOT / "charts/qwen3-omni"), "-n", ns, "--create-namespace", "--wait=false")
    deploy = cluster.get_json("deployment", "-n", ns, "-l", "app.kubernetes.io/component=operator")["items"][0]
    pod, ctr = pod_of(deploy)
    sa = pod["serviceAccountName"]
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "token").write_text(cluster.kubectl("create", "token", sa, "-n", ns, "--duration", "1h").stdout.strip())
    (secrets / "ca.crt").write_bytes(cluster.ca_file.read_bytes())
    (secrets / "namespace").write_text(ns)
    health, metrics = free_ports(2)
    args = {f"--health-port={ctr['ports'][0]['containerPort']}": f"--health-port={health}",
            f"--metrics-port={ctr['ports'][1]['containerPort']}": f"--metrics-port={metrics}"}
    api = cluster.server.removeprefix("https://")
    config = images.image_config(built["operator"])
    with image_run.Container(built["operator"]) as c:
        spec = image_run.pod_run_spec(pod, ctr, config, tmp_path / "volumes", fields={**FIELDS, "metadata.namespace": ns},
                                   replace_args=args)
        assert set(spec.argv) >= set(args.values()), spec.argv  # the chart's port flags were found and swapped
        spec.env |= {"KUBERNETES_SERVICE_HOST": api.rsplit(":", 1)[0], "KUBERNETES_SERVICE_PORT": api.rsplit(":", 1)[1]}
        spec.volumes.append(image_run.Volume(secrets, "/var/run/secrets/kubernetes.io/serviceaccount", read_only=True))
        assert spec.read_only_root and spec.uid == 65532
        c.start(spec, tmp_path / "operator.log")
        image_run.wait_http(f"http://127.0.0.1:{health}/healthz", c)
        image_run.wait_http(f"http://127.0.0.1:{health}/readyz", c, timeout=60)  # its watches run
        pid = assert_runs_as(c, "omni-operator", 65532, 65532)
        # It reconciles: the example's status is written by this process (no other operator runs).
        example = yaml.safe_load((ROOT / "examples/omni.yaml").read_text())
        example["metadata"]["namespace"] = ns
        cluster.apply(example)
        cluster.wait_for("the operator in the image to write the example's status", lambda: (
            cluster.get_json("omni", example["metadata"]["name"], "-n", ns).get("status", {}).get("observedGeneration")
            == 1), timeout=60)
        # the counter goes up once the reconcile that wrote the status returns
        text = cluster.wait_for("a reconcile counted in /metrics", lambda: next(
            (t for s, t in [image_run.http_get(f"http://127.0.0.1:{metrics}/metrics")]
             if s == 200 and "omni_operator_reconcile_total{" in t), None), timeout=30)
        counted = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("omni_operator_reconcile_total{")}
        assert counted.get('omni_operator_reconcile_total{result="ok"}', 0) >= 1, (counted, c.log_tail())
        helm_test_pod_passes(cluster, release, ns, health, built["operator"], tmp_path)
        assert c.terminate(pid) == 0, c.log_tail()
        assert c.writes() == [], "wrote outside its volumes (the pod's root is read-only)"


def helm_test_pod_passes(cluster, release, ns, health_port, image, tmp_path):
    """`helm test`'s pod (it uses the operator image) run in the image against the operator."""
    hooks = [d for d in yaml.safe_load_all(cluster.helm("get", "hooks", release, "-n", ns).stdout) if d]
    (pod_obj,) = [d for d in hooks if d["kind"] == "Pod" and d["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    pod, ctr = pod_obj["spec"], pod_obj["spec"]["containers"][0]
    url = next(e["value"] for e in ctr["env"] if e["name"] == "HEALTHZ_URL")
    with image_run.Container(image) as c:
        spec = image_run.pod_run_spec(pod, ctr, images.image_config(image), tmp_path / "test-volumes", fields=FIELDS,
                                   replace_env={"HEALTHZ_URL": f"http://127.0.0.1:{health_port}/healthz"})
        proc = c.run(spec)
        assert proc.returncode == 0, f"helm test pod ({url}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.mark.parametrize("name", images.CI_IMAGES)
def test_sbom_lists_the_installed_environment(built, name):
    doc = images.sbom(built[name], images.OUT_DIR / f"{name}.cdx.json")
    assert doc["bomFormat"] == "CycloneDX" and doc["metadata"]["component"]["version"] == images.project_version()
    versions = {c["name"].lower().replace("_", "-"): c.get("version") for c in doc["components"]}
    assert versions["qwen3-omni-operator"] == images.project_version()
    for dist in ("kopf", "kubernetes", "aiohttp", "pydantic", *(("huggingface-hub",) if name == "gateway" else ())):
        assert versions.get(dist), f"{dist} missing from the SBOM of {name}: {sorted(versions)}"
    assert "pip" not in versions and "setuptools" not in versions  # removed from the image's venv
    assert ("huggingface-hub" in versions) == (name == "gateway")

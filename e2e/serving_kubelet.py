"""Kubelet stand-in for the operator's serving pods (thinker, talker, gateway), for the demo.

The loader kubelet (e2e/kubelet.py) runs a pod's ``omni-runtime`` command once; a serving pod
(``restartPolicy: Always``) is run as a kubelet runs it:
- started with the environment and volumes the operator rendered, on the pod's address;
- Ready only while its ``readinessProbe`` (httpGet) answers 2xx, so the stand-in DNS, the
  StatefulSet's ready count and the OmniDeployment's Ready condition follow the real process;
- restarted after it exits, with a doubling back-off (``CrashLoopBackOff`` in the meantime, the
  exit code and the log tail in ``lastState``);
- stopped (SIGTERM, then SIGKILL after the grace period) when the pod is deleted;
- not started at all when its image cannot be pulled: this node's registry holds only the images
  the operator renders by default (``ghcr.io/qwen3-omni/<role>:<operator version>``, or the list
  ``serve_pods(images=...)`` gives); any other reference is reported as a kubelet reports a missing
  image, ``ErrImagePull`` (the registry's "not found"), then ``ImagePullBackOff`` until the pull is
  retried with the same doubling back-off, the pod Pending and no process started.

The fake GPU nodes have no GPU, so this node overrides what only a GPU could honour (its
``node_env``): ``OMNI_DEVICE=cpu`` and the thinker's transformers engine (vLLM's sizing args
name tensor parallelism and a KV cache for 80 GB cards). Service names resolve through the
stand-in cluster DNS (e2e/pod_dns, e2e/service_dns.py).

kwok still plays the rest of the kubelet (the pod's address, deletion). Its pod-ready stage gives
a Pending pod its address and marks it Running and Ready in the same step; the pod is started and
reported not ready on the next pass (half a second), since only the probe decides. A cluster
started with ``probe_serving_pods`` (e2e/kwok_stages.py) has kwok give these pods their address
without Ready, so no replica ever counts before its process answers.
"""

from __future__ import annotations

import logging
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from e2e.kubelet import Container, LoaderKubelet, exit_code, now, pod_ready, termination_message
from omni_operator import __version__
from omni_operator.rendering.meta import DEFAULT_IMAGE_REPOSITORY, ROLES
from omni_runtime.config import Env

SERVING_SELECTOR = ("app.kubernetes.io/managed-by=omni-operator,"
                    "app.kubernetes.io/component in (thinker,talker,gateway)")
POD_DNS_DIR = Path(__file__).resolve().parent / "pod_dns"
BACKOFF_START, BACKOFF_MAX = 5.0, 60.0  # a kubelet starts at 10 s and caps at 300 s
GRACE_MAX = 30.0  # the demo does not wait a production grace period (the operator renders minutes)

# What this node's registry holds: the images the operator renders when a role names none.
DEFAULT_IMAGES = frozenset(f"{DEFAULT_IMAGE_REPOSITORY}/{role}:{__version__}" for role in ROLES)
ERR_IMAGE_PULL, IMAGE_PULL_BACKOFF = "ErrImagePull", "ImagePullBackOff"

log = logging.getLogger("node-agent.serving")


@dataclass
class Probe:
    """A container's readiness as its probe last saw it."""

    port: int | None
    path: str
    period: float
    failure_threshold: int
    ready: bool = False
    failures: int = 0
    next_at: float = 0.0


@dataclass
class Pull:
    """An image this node could not pull, waiting for its next try."""

    at: float
    count: int


@dataclass
class Restart:
    """A crashed container waiting for its back-off."""

    at: float
    last_state: dict[str, Any]


class ServingKubelet(LoaderKubelet):
    def __init__(self, api, pods_dir: Path, *, python: str, hub_url: str | None, dns_records: Path):
        super().__init__(api, pods_dir, python=python, hub_url=hub_url)
        self.dns_records = dns_records
        self.probes: dict[str, Probe] = {}        # pod uid -> readiness of its running container
        self.restarts: dict[str, Restart] = {}    # pod uid -> its last exit, while it waits to restart
        self.restart_counts: dict[str, int] = {}  # pod uid -> restarts so far
        self.pulls: dict[str, Pull] = {}          # pod uid -> its failed image pull
        self.images: frozenset[str] = DEFAULT_IMAGES  # what can be pulled here

    def _node_env(self, pod: dict[str, Any]) -> dict[str, str]:
        return {
            **super()._node_env(pod),
            Env.DEVICE: "cpu",
            Env.THINKER_ENGINE: "transformers",
            "OMP_NUM_THREADS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "PYTHONPATH": str(POD_DNS_DIR),
            "OMNI_E2E_DNS_RECORDS": str(self.dns_records),
        }

    # -- the loop ----------------------------------------------------------------------------

    def sync(self) -> None:
        status, body = self.api.request("GET", f"/api/v1/pods?labelSelector={quote(SERVING_SELECTOR)}")
        if status != 200:
            log.warning("listing serving pods: HTTP %s %s", status, body)
            return
        pods = {p["metadata"]["uid"]: p for p in body.get("items", [])}
        # New pods first: each pass that a new pod waits gives kwok's pod-ready stage a chance.
        for uid, pod in pods.items():
            if uid in self.running or uid in self.finished or not self._startable(pod):
                continue
            restart = self.restarts.get(uid)
            if restart is None or time.monotonic() >= restart.at:
                self._start(pod)
        for uid, c in list(self.running.items()):
            pod = pods.get(uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                self._kill(c)
            elif c.proc.poll() is not None:
                self._crashed(pod, c)
            else:
                self._probe(pod, c)
        for uid, c in list(self.finished.items()):
            if uid not in pods:
                self._forget(uid, c)

    def stop_pods(self) -> None:
        """Stop every container (serving was switched off)."""
        self.stop()
        for uid, c in list(self.running.items()):
            self._forget(uid, c)
        self.running.clear()

    def _forget(self, uid: str, c: Container) -> None:
        for d in c.volume_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.finished.pop(uid, None)
        for table in (self.probes, self.restarts, self.restart_counts, self.pulls):
            table.pop(uid, None)

    @staticmethod
    def _startable(pod: dict[str, Any]) -> bool:
        # From the moment kwok gives the pod its address (still Pending): reporting it Running
        # first keeps kwok's own pod-ready stage, which would mark it Ready, from matching.
        st = pod.get("status", {})
        return (not pod["metadata"].get("deletionTimestamp") and bool(st.get("podIP"))
                and bool(pod["spec"].get("nodeName")) and st.get("phase") in ("Pending", "Running"))

    # -- starting, probing, restarting ---------------------------------------------------------

    def _start(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        if not self._pulled(pod):
            return
        c = self._launch(pod)
        if c is None:
            return
        self.running[uid] = c
        ctr = pod["spec"]["containers"][0]
        self.probes[uid] = _probe_of(ctr)
        c.grace = min(float(pod["spec"].get("terminationGracePeriodSeconds", 30)), GRACE_MAX)
        self._report(pod, c, ready=False)

    def _pulled(self, pod: dict[str, Any]) -> bool:
        """True when the container's image is here; else the pull's failure is reported as a
        kubelet reports it: ErrImagePull on each try, ImagePullBackOff between tries."""
        uid, ctr = pod["metadata"]["uid"], pod["spec"]["containers"][0]
        image = ctr.get("image", "")
        if image in self.images:
            self.pulls.pop(uid, None)
            return True
        pull = self.pulls.get(uid)
        if pull is None or time.monotonic() >= pull.at:
            count = (pull.count if pull else 0) + 1
            self.pulls[uid] = Pull(time.monotonic() + min(BACKOFF_START * 2 ** (count - 1), BACKOFF_MAX), count)
            waiting = {"reason": ERR_IMAGE_PULL, "message": pull_error(image)}
        else:
            waiting = {"reason": IMAGE_PULL_BACKOFF, "message": f'Back-off pulling image "{image}"'}
        statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        if pod["status"].get("phase") == "Pending" and not pod_ready(pod) \
                and statuses[0].get("state", {}).get("waiting") == waiting:
            return False  # already reported
        if waiting["reason"] == ERR_IMAGE_PULL:
            log.info("cannot pull %s for %s/%s", image, pod["metadata"]["namespace"], pod["metadata"]["name"])
        self._patch_status(pod, "Pending", False, {
            "name": ctr["name"], "image": image, "imageID": "", "ready": False, "started": False,
            "restartCount": self.restart_counts.get(uid, 0), "state": {"waiting": waiting}},
            reason="ContainersNotReady")
        return False

    def _probe(self, pod: dict[str, Any], c: Container) -> None:
        probe = self.probes[c.uid]
        if time.monotonic() < probe.next_at:
            return
        probe.next_at = time.monotonic() + (probe.period if probe.ready else 0.5)
        ok = probe.port is None or _http_ok(f"http://{pod['status']['podIP']}:{probe.port}{probe.path}")
        probe.failures = 0 if ok else probe.failures + 1
        ready = ok or (probe.ready and probe.failures < probe.failure_threshold)
        if ready != probe.ready or pod_ready(pod) != ready:
            if self._report(pod, c, ready=ready):
                probe.ready = ready
                log.info("%s/%s %s", c.namespace, c.name, "ready" if ready else "not ready")

    def _crashed(self, pod: dict[str, Any], c: Container) -> None:
        code = exit_code(c.proc.returncode)
        count = self.restart_counts.get(c.uid, 0) + 1
        delay = min(BACKOFF_START * 2 ** (count - 1), BACKOFF_MAX)
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": c.started_at, "finishedAt": now()}
        message = termination_message(c, code)
        if message:
            terminated["message"] = message
        waiting = {"reason": "CrashLoopBackOff",
                   "message": f"back-off {delay:.0f}s restarting failed container={c.container} pod={c.name}"}
        ok = self._patch_status(pod, "Running", False, {
            "name": c.container, "image": c.image, "ready": False, "started": False, "restartCount": count,
            "state": {"waiting": waiting}, "lastState": {"terminated": terminated}}, reason="ContainersNotReady")
        if not ok:
            return  # the apiserver is away: report on the next pass
        log.warning("%s/%s exited with %d; restarting in %.0fs", c.namespace, c.name, code, delay)
        del self.running[c.uid]
        self.restart_counts[c.uid] = count
        self.restarts[c.uid] = Restart(time.monotonic() + delay, {"terminated": terminated})

    def _report(self, pod: dict[str, Any], c: Container, *, ready: bool) -> bool:
        restart = self.restarts.get(c.uid)
        status: dict[str, Any] = {
            "name": c.container, "image": c.image, "ready": ready, "started": True,
            "restartCount": self.restart_counts.get(c.uid, 0), "state": {"running": {"startedAt": c.started_at}}}
        if restart is not None:
            status["lastState"] = restart.last_state
        return self._patch_status(pod, "Running", ready, status, reason=None if ready else "ContainersNotReady")


def pull_error(image: str) -> str:
    """containerd's words, through the kubelet, for a reference its registry does not have."""
    return (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
            f'failed to resolve reference "{image}": {image}: not found')


def _probe_of(ctr: dict[str, Any]) -> Probe:
    """The container's readinessProbe (httpGet only); none means ready once started."""
    spec = ctr.get("readinessProbe") or {}
    get = spec.get("httpGet")
    port = None
    if get:
        port = get.get("port")
        if isinstance(port, str):
            port = next((p["containerPort"] for p in ctr.get("ports", []) if p.get("name") == port), None)
    return Probe(port=port, path=(get or {}).get("path", "/"), period=float(spec.get("periodSeconds", 10)),
                 failure_threshold=int(spec.get("failureThreshold", 3)))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return 200 <= r.status < 400
    except OSError:
        return False

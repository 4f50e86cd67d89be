"""Kubelet stand-in for the operator's weight-loader pods: their process runs for real.

kwok plays the kubelet of the fake nodes and runs no containers. For a loader pod
(``LOADER_SELECTOR``) that kwok made Running with a pod IP, this runs the container's
``omni-runtime ...`` command as ``<python> -m omni_runtime.cli ...`` on this machine, with
the environment and volumes a kubelet would give it, and reports the exit in the pod's
status; the real Job controller then applies backoffLimit and podFailurePolicy.

Per pod, under ``<pods_dir>/<pod uid>/``: ``<container>.log`` (stdout and stderr),
``<container>.termination-log``, ``<container>.pid`` (the running process, for a test that kills
it as a node's OOM killer would) and one directory per volume that is not a claim (emptyDir;
Secret, ConfigMap, downward API and projected volumes with their files, the service-account
token included).
Only ``restartPolicy: Never`` pods with one container are supported (what a loader Job makes).
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from e2e.kubeapi import KubeApi
from e2e.procs import die_with_parent, signal_process
from omni_runtime.config import Env

LOADER_SELECTOR = "app.kubernetes.io/component=weights,app.kubernetes.io/managed-by=omni-operator"
ENTRYPOINT = "omni-runtime"  # the only command this node can run: the package under test
CONFIG_ERROR = "CreateContainerConfigError"
# What a kubelet puts in the message of a failed container with FallbackToLogsOnError.
LOG_TAIL_LINES, LOG_TAIL_BYTES = 80, 2048
TERMINATION_MESSAGE_BYTES = 4096
KILL_GRACE_SECONDS = 5.0

log = logging.getLogger("node-agent.kubelet")


class ConfigError(Exception):
    """The container's environment or volumes cannot be resolved: it must not start."""


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    namespace: str
    name: str
    uid: str
    container: str
    image: str
    proc: subprocess.Popen
    log_file: Path
    termination_log: Path
    fallback_to_logs: bool
    started_at: str
    volume_dirs: list[Path] = field(default_factory=list)
    kill_deadline: float | None = None
    grace: float = KILL_GRACE_SECONDS  # SIGTERM, then SIGKILL after this long


def _log_tail(path: Path) -> str:
    try:
        data = path.read_bytes()[-64 * 1024:]
    except OSError:
        return ""
    tail = b"\n".join(data.rstrip(b"\n").split(b"\n")[-LOG_TAIL_LINES:])
    return tail[-LOG_TAIL_BYTES:].decode("utf-8", "replace")


def termination_message(c: Container, code: int) -> str:
    """What a kubelet reports as terminated.message: the termination log, else (when the
    container failed and asks for it) the tail of its log."""
    try:
        message = c.termination_log.read_bytes()[:TERMINATION_MESSAGE_BYTES].decode("utf-8", "replace")
    except OSError:
        message = ""
    if not message.strip() and code != 0 and c.fallback_to_logs:
        message = _log_tail(c.log_file)
    return message


def exit_code(returncode: int) -> int:
    """A container killed by a signal exits with 128 + the signal, as a kubelet reports it."""
    return 128 - returncode if returncode < 0 else returncode


class LoaderKubelet:
    def __init__(self, api: KubeApi, pods_dir: Path, *, python: str, hub_url: str | None):
        self.api = api
        self.pods_dir = pods_dir
        self.python = python
        self.hub_url = hub_url
        self.running: dict[str, Container] = {}   # pod uid -> its process
        self.finished: dict[str, Container] = {}  # exited and reported, until the pod is gone

    # -- the loop ----------------------------------------------------------------------------

    def sync(self) -> None:
        status, body = self.api.request("GET", f"/api/v1/pods?labelSelector={quote(LOADER_SELECTOR)}")
        if status != 200:
            log.warning("listing loader pods: HTTP %s %s", status, body)
            return
        pods = {p["metadata"]["uid"]: p for p in body.get("items", [])}
        for uid, c in list(self.running.items()):
            pod = pods.get(uid)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                self._kill(c)
            elif c.proc.poll() is not None and self._report_exit(c):
                del self.running[uid]
                self.finished[uid] = c
        for uid, c in list(self.finished.items()):
            if uid not in pods:  # a kubelet removes a pod's own volumes with the pod; logs stay
                for d in c.volume_dirs:
                    shutil.rmtree(d, ignore_errors=True)
                del self.finished[uid]
        for uid, pod in pods.items():
            if uid not in self.running and uid not in self.finished and self._startable(pod):
                self._start(pod)

    def stop(self, grace: float = KILL_GRACE_SECONDS) -> None:
        for c in self.running.values():
            signal_process(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.running.values():
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_process(c.proc.pid, signal.SIGKILL)
                c.proc.wait()

    @staticmethod
    def _startable(pod: dict[str, Any]) -> bool:
        st = pod.get("status", {})
        if pod["metadata"].get("deletionTimestamp") or not st.get("podIP") or not pod["spec"].get("nodeName"):
            return False
        if st.get("phase") == "Running":  # kwok made it Running; this node has not run it yet
            return True
        # Pending with a configuration error: retried on every pass, as a kubelet does.
        return st.get("phase") == "Pending" and _waiting_reason(pod) == CONFIG_ERROR

    # -- starting ----------------------------------------------------------------------------

    def _start(self, pod: dict[str, Any]) -> None:
        c = self._launch(pod)
        if c is None:
            return
        self.running[c.uid] = c
        self._patch_status(pod, "Running", True, {
            "name": c.container, "image": c.image, "ready": True, "started": True,
            "restartCount": 0, "state": {"running": {"startedAt": c.started_at}}})

    def _node_env(self, pod: dict[str, Any]) -> dict[str, str]:
        """What this node adds to (or overrides in) the container's environment."""
        return {Env.HOST: pod["status"]["podIP"]}  # the process listens on its pod's address

    def _launch(self, pod: dict[str, Any]) -> Container | None:
        """Start the pod's container; None when it cannot start (reported in the pod's status)."""
        meta, spec = pod["metadata"], pod["spec"]
        ctr = spec["containers"][0]
        pod_dir = self.pods_dir / meta["uid"]
        pod_dir.mkdir(parents=True, exist_ok=True)
        log_file = pod_dir / f"{ctr['name']}.log"
        termination_log = pod_dir / f"{ctr['name']}.termination-log"
        try:
            mounts, own = self._mounts(pod, ctr, pod_dir)
            env = self._environment(pod, ctr, mounts)
            self._fill(pod, own, mounts)
        except ConfigError as e:
            self._report_config_error(pod, ctr, str(e))
            return None
        env.update({**self._node_env(pod), Env.TERMINATION_LOG: str(termination_log)})
        if self.hub_url:
            env.setdefault("HF_ENDPOINT", self.hub_url)  # this node's hub mirror; a pod's own setting wins
        argv = list(ctr.get("command") or []) + list(ctr.get("args") or [])
        started_at = now()
        termination_log.unlink(missing_ok=True)
        if not argv or os.path.basename(argv[0]) != ENTRYPOINT:
            log_file.write_text(f"this node runs only {ENTRYPOINT} commands, not {argv}\n")
            self._patch_terminated(pod, ctr, 128, "StartError", f"cannot run {argv!r} here", started_at)
            return None
        workdir = Path(_host_path(ctr["workingDir"], mounts)) if ctr.get("workingDir") else pod_dir
        if not workdir.is_dir():  # a directory of the image, which this node does not have
            workdir = pod_dir
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                [self.python, "-m", "omni_runtime.cli", *argv[1:]], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
                preexec_fn=die_with_parent,  # no container outlives the agent
            )
        (pod_dir / f"{ctr['name']}.pid").write_text(str(proc.pid))
        log.info("started %s/%s (pid %d): %s; log %s", meta["namespace"], meta["name"], proc.pid,
                 " ".join(argv), log_file)
        return Container(
            namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], container=ctr["name"],
            image=ctr.get("image", ""), proc=proc, log_file=log_file, termination_log=termination_log,
            fallback_to_logs=ctr.get("terminationMessagePolicy") == "FallbackToLogsOnError",
            started_at=started_at, volume_dirs=list(own))

    def _mounts(self, pod: dict[str, Any], ctr: dict[str, Any], pod_dir: Path
                ) -> tuple[dict[str, Path], dict[Path, dict[str, Any]]]:
        """mountPath -> host directory, and the pod's own volumes still to fill (by directory)."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: dict[str, Path] = {}
        own: dict[Path, dict[str, Any]] = {}
        for m in ctr.get("volumeMounts", []):
            vol = volumes.get(m["name"], {"name": m["name"]})
            if "persistentVolumeClaim" in vol:
                host = self._claim_dir(pod["metadata"]["namespace"], vol["persistentVolumeClaim"]["claimName"])
            else:
                host = pod_dir / m["name"]
                own[host] = vol
            mounts[m["mountPath"].rstrip("/") or "/"] = host / m["subPath"] if m.get("subPath") else host
        return mounts, own

    def _fill(self, pod: dict[str, Any], own: dict[Path, dict[str, Any]], mounts: dict[str, Path]) -> None:
        for directory, vol in own.items():
            files = self._volume_files(pod, vol)
            directory.mkdir(exist_ok=True)
            for rel, data in files.items():
                (directory / rel).parent.mkdir(parents=True, exist_ok=True)
                (directory / rel).write_bytes(data)
        for host in mounts.values():  # subPath directories are created on demand, as a kubelet does
            host.mkdir(parents=True, exist_ok=True)

    def _volume_files(self, pod: dict[str, Any], vol: dict[str, Any]) -> dict[str, bytes]:
        """The files a kubelet writes into a volume that is not a claim (none for an emptyDir)."""
        ns = pod["metadata"]["namespace"]
        if "emptyDir" in vol:
            return {}
        if "configMap" in vol or "secret" in vol:
            return self._object_files(ns, vol.get("configMap") or {**vol["secret"], "name": vol["secret"]["secretName"]},
                                      secret="secret" in vol)
        if "downwardAPI" in vol:
            return _downward_files(pod, vol["downwardAPI"].get("items", []))
        files: dict[str, bytes] = {}
        for src in vol.get("projected", {}).get("sources", []):
            if "serviceAccountToken" in src:
                files[src["serviceAccountToken"]["path"]] = self._token(pod, src["serviceAccountToken"])
            elif "configMap" in src or "secret" in src:
                files.update(self._object_files(ns, src.get("configMap") or src["secret"], secret="secret" in src))
            elif "downwardAPI" in src:
                files.update(_downward_files(pod, src["downwardAPI"].get("items", [])))
            else:
                raise ConfigError(f"volume {vol['name']!r}: unsupported projected source {sorted(src)}")
        if "projected" not in vol:
            raise ConfigError(f"volume {vol.get('name')!r}: {sorted(set(vol) - {'name'})} cannot be mounted here")
        return files

    def _object_files(self, ns: str, ref: dict[str, Any], *, secret: bool) -> dict[str, bytes]:
        data = self._object_data(ns, ref["name"], secret=secret, optional=ref.get("optional", False)) or {}
        if not ref.get("items"):
            return data
        kind = "Secret" if secret else "ConfigMap"
        files = {}
        for item in ref["items"]:
            if item["key"] not in data and not ref.get("optional"):
                raise ConfigError(f"couldn't find key {item['key']} in {kind} {ns}/{ref['name']}")
            if item["key"] in data:
                files[item["path"]] = data[item["key"]]
        return files

    def _token(self, pod: dict[str, Any], src: dict[str, Any]) -> bytes:
        """A service-account token bound to the pod (TokenRequest), as the kubelet mounts it."""
        meta = pod["metadata"]
        spec: dict[str, Any] = {"expirationSeconds": src.get("expirationSeconds", 3600),
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                                   "uid": meta["uid"]}}
        if src.get("audience"):
            spec["audiences"] = [src["audience"]]
        account = pod["spec"].get("serviceAccountName") or "default"
        status, body = self.api.request(
            "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        if status != 201:
            raise ConfigError(f"token of service account {account!r}: HTTP {status}")
        return body["status"]["token"].encode()

    def _claim_dir(self, ns: str, claim: str) -> Path:
        status, pvc = self.api.request("GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
        volume = pvc.get("spec", {}).get("volumeName") if status == 200 else None
        if not volume:
            raise ConfigError(f'persistentvolumeclaim "{claim}" is not bound')
        status, pv = self.api.request("GET", f"/api/v1/persistentvolumes/{volume}")
        path = pv.get("spec", {}).get("hostPath", {}).get("path") if status == 200 else None
        if not path:
            raise ConfigError(f'persistentvolume "{volume}" is not a hostPath volume of this node')
        return Path(path)

    def _environment(self, pod: dict[str, Any], ctr: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
        meta = pod["metadata"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOSTNAME": meta["name"],
            # an image's home directory: anything the process writes there stays with the pod
            "HOME": str(self.pods_dir / meta["uid"] / ".home"),
            "PYTHONUNBUFFERED": "1",
        }
        Path(env["HOME"]).mkdir(exist_ok=True)
        fields = _fields(pod)
        for var in ctr.get("env", []):
            source = var.get("valueFrom")
            if source is None:
                value = var.get("value", "")
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                if path not in fields:
                    raise ConfigError(f"unsupported fieldPath {path!r} in env {var['name']}")
                value = fields[path]
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                found = self._key_ref(meta["namespace"], source)
                if found is None:
                    continue  # optional and absent
                value = found
            else:
                raise ConfigError(f"unsupported valueFrom in env {var['name']}")
            env[var["name"]] = _host_path(value, mounts)
        return env

    def _key_ref(self, ns: str, source: dict[str, Any]) -> str | None:
        """A Secret's or ConfigMap's key, in the words a kubelet uses when it is missing."""
        secret = "secretKeyRef" in source
        ref = source["secretKeyRef" if secret else "configMapKeyRef"]
        data = self._object_data(ns, ref["name"], secret=secret, optional=ref.get("optional", False))
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {'Secret' if secret else 'ConfigMap'} "
                              f"{ns}/{ref['name']}")
        return data[ref["key"]].decode()

    def _object_data(self, ns: str, name: str, *, secret: bool, optional: bool) -> dict[str, bytes] | None:
        """A Secret's or ConfigMap's data (None: absent and optional)."""
        kind = "secret" if secret else "configmap"
        status, obj = self.api.request("GET", f"/api/v1/namespaces/{ns}/{kind}s/{name}")
        if status == 404:
            if optional:
                return None
            raise ConfigError(f'{kind} "{name}" not found')
        if status != 200:
            raise ConfigError(f'reading {kind} "{name}": HTTP {status}')
        data = {k: base64.b64decode(v) if secret else v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    # -- reporting ----------------------------------------------------------------------------

    def _report_config_error(self, pod: dict[str, Any], ctr: dict[str, Any], message: str) -> None:
        waiting = {"reason": CONFIG_ERROR, "message": message}
        current = (pod.get("status", {}).get("containerStatuses") or [{}])[0].get("state", {}).get("waiting")
        if pod["status"].get("phase") == "Pending" and current == waiting:
            return  # already reported; a kubelet retries without rewriting the status
        log.info("cannot start %s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], message)
        self._patch_status(pod, "Pending", False, {
            "name": ctr["name"], "image": ctr.get("image", ""), "ready": False, "started": False,
            "restartCount": 0, "state": {"waiting": waiting}}, reason="ContainersNotReady")

    def _report_exit(self, c: Container) -> bool:
        code = exit_code(c.proc.returncode)
        message = termination_message(c, code)
        status, pod = self.api.request("GET", f"/api/v1/namespaces/{c.namespace}/pods/{c.name}")
        if status == 404 or (status == 200 and pod["metadata"]["uid"] != c.uid):
            return True  # the pod is gone: nobody to report to
        if status != 200:
            return False  # the apiserver is away: report on the next pass
        ctr = {"name": c.container, "image": c.image}
        ok = self._patch_terminated(pod, ctr, code, "Completed" if code == 0 else "Error", message, c.started_at)
        if ok:
            log.info("%s/%s exited with %d", c.namespace, c.name, code)
        return ok

    def _patch_terminated(self, pod: dict[str, Any], ctr: dict[str, Any], code: int, reason: str, message: str,
                          started_at: str) -> bool:
        terminated = {"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": now()}
        if message:
            terminated["message"] = message
        return self._patch_status(pod, "Succeeded" if code == 0 else "Failed", False, {
            "name": ctr["name"], "image": ctr.get("image", ""), "ready": False, "started": False,
            "restartCount": 0, "state": {"terminated": terminated}}, reason="PodCompleted")

    def _patch_status(self, pod: dict[str, Any], phase: str, ready: bool, container_status: dict[str, Any],
                      reason: str | None = None) -> bool:
        meta = pod["metadata"]
        stamp = now()
        conditions = []
        for kind in ("Ready", "ContainersReady"):
            cond: dict[str, Any] = {"type": kind, "status": "True" if ready else "False",
                                    "lastTransitionTime": stamp}
            if reason:
                cond["reason"] = reason
            conditions.append(cond)
        # Strategic merge: conditions merge by type (PodScheduled and Initialized stay);
        # containerStatuses is replaced as a whole, so no stale running/waiting state remains.
        # The uid precondition keeps a status from landing on a new pod of the same name.
        body = {"metadata": {"uid": meta["uid"]},
                "status": {"phase": phase, "conditions": conditions, "containerStatuses": [container_status]}}
        status, resp = self.api.request(
            "PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", body, patch="strategic")
        if status != 200:
            log.warning("status of %s/%s: HTTP %s %s", meta["namespace"], meta["name"], status, resp)
        return status == 200

    def _kill(self, c: Container) -> None:
        if c.proc.poll() is not None:
            del self.running[c.uid]
            self.finished[c.uid] = c
            return
        if c.kill_deadline is None:
            log.info("pod %s/%s deleted: stopping pid %d", c.namespace, c.name, c.proc.pid)
            signal_process(c.proc.pid, signal.SIGTERM)
            c.kill_deadline = time.monotonic() + c.grace
        elif time.monotonic() > c.kill_deadline:
            signal_process(c.proc.pid, signal.SIGKILL)


def _fields(pod: dict[str, Any]) -> dict[str, str]:
    """The downward API's fields this node can fill in."""
    meta = pod["metadata"]
    return {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
            "spec.nodeName": pod["spec"].get("nodeName", ""), "spec.serviceAccountName":
            pod["spec"].get("serviceAccountName", ""), "status.podIP": pod["status"].get("podIP", "")}


def _downward_files(pod: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, bytes]:
    fields = _fields(pod)
    files = {}
    for item in items:
        path = item.get("fieldRef", {}).get("fieldPath")
        if path not in fields:
            raise ConfigError(f"unsupported downward API item {item}")
        files[item["path"]] = fields[path].encode()
    return files


def pod_ready(pod: dict[str, Any]) -> bool:
    """The pod's Ready condition is True."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions", []))


def _waiting_reason(pod: dict[str, Any]) -> str | None:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return (statuses[0].get("state", {}).get("waiting") or {}).get("reason")


def _host_path(value: str, mounts: dict[str, Path]) -> str:
    """A container path (or a value naming one) as the host path behind its volume mount."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + value[len(mount_path):]
    return value

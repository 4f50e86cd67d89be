"""Storage provisioner stand-in: a hostPath PersistentVolume for every pending claim.

Nothing on the local control plane provisions volumes, so a pod that mounts a claim would
never schedule. For each Pending PVC without a volume this creates a PV pre-bound to it
(claimRef with the claim's uid) over a fresh directory; kube-controller-manager's PV
controller binds the two as it would a dynamically provisioned volume. PVs it made that
become Released (their claim was deleted) are deleted together with their directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from e2e.kubeapi import KubeApi

PROVISIONER = "omni-node-agent"
PROVISIONED_BY_LABEL = "omni.qwen.ai/provisioned-by"  # marks the PVs this provisioner owns

log = logging.getLogger("node-agent.volumes")


def pv_manifest(pvc: dict[str, Any], host_dir: Path) -> dict[str, Any]:
    meta, spec = pvc["metadata"], pvc.get("spec", {})
    pv_spec: dict[str, Any] = {
        "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
        "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": "Retain",
        "volumeMode": "Filesystem",
        "hostPath": {"path": str(host_dir), "type": "Directory"},
        "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                     "name": meta["name"], "uid": meta["uid"]},
    }
    if spec.get("storageClassName"):  # unset or "" both mean: a volume of no class
        pv_spec["storageClassName"] = spec["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"pvc-{meta['uid']}", "labels": {PROVISIONED_BY_LABEL: PROVISIONER}},
        "spec": pv_spec,
    }


class HostPathProvisioner:
    def __init__(self, api: KubeApi, volumes_dir: Path):
        self.api = api
        self.dir = volumes_dir

    def sync(self) -> None:
        status, body = self.api.request("GET", "/api/v1/persistentvolumeclaims")
        if status != 200:
            log.warning("listing PVCs: HTTP %s %s", status, body)
            return
        for pvc in body.get("items", []):
            if self._wants_volume(pvc):
                self._provision(pvc)
        status, body = self.api.request(
            "GET", f"/api/v1/persistentvolumes?labelSelector={PROVISIONED_BY_LABEL}%3D{PROVISIONER}")
        if status != 200:
            log.warning("listing PVs: HTTP %s %s", status, body)
            return
        for pv in body.get("items", []):
            if pv.get("status", {}).get("phase") == "Released" and not pv["metadata"].get("deletionTimestamp"):
                self._reclaim(pv)

    @staticmethod
    def _wants_volume(pvc: dict[str, Any]) -> bool:
        spec = pvc.get("spec", {})
        return (pvc.get("status", {}).get("phase") == "Pending" and not spec.get("volumeName")
                and not pvc["metadata"].get("deletionTimestamp")
                and spec.get("volumeMode", "Filesystem") == "Filesystem")  # a directory is no block device

    def _provision(self, pvc: dict[str, Any]) -> None:
        manifest = pv_manifest(pvc, self.dir / f"pvc-{pvc['metadata']['uid']}")
        host_dir = Path(manifest["spec"]["hostPath"]["path"])
        host_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(host_dir, 0o777)  # any user may write, as with a fresh volume whose pod sets fsGroup
        status, body = self.api.request("POST", "/api/v1/persistentvolumes", manifest)
        if status == 201:
            meta = pvc["metadata"]
            log.info("provisioned %s for PVC %s/%s at %s", manifest["metadata"]["name"], meta["namespace"],
                     meta["name"], host_dir)
        elif status != 409:  # 409: made in an earlier pass, the PV controller has not bound it yet
            log.warning("creating %s: HTTP %s %s", manifest["metadata"]["name"], status, body)

    def _reclaim(self, pv: dict[str, Any]) -> None:
        name = pv["metadata"]["name"]
        status, body = self.api.request("DELETE", f"/api/v1/persistentvolumes/{name}")
        if status not in (200, 202, 404):
            log.warning("deleting %s: HTTP %s %s", name, status, body)
            return
        path = Path(pv["spec"].get("hostPath", {}).get("path", ""))
        if path.parent == self.dir:  # only directories this provisioner made
            shutil.rmtree(path, ignore_errors=True)
        log.info("deleted released %s and its directory", name)

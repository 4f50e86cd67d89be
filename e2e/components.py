"""How each control-plane component is launched on loopback, and how it is probed for health."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from e2e.nodes import KWOK_NODE_LABEL, NODE_IP, POD_CIDR
from e2e.pki import Pki

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "omni-local"

# With ``LocalCluster(audit=True)``: write requests of service accounts, except kube-system's
# (the controllers run under those). Here the only other service-account client is an operator
# running under its own account (kwok's pods run nothing), so logs/audit.log holds its writes.
AUDIT_POLICY: Mapping[str, Any] = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],  # one entry per request, when its response is complete
    "rules": [
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"],
         "verbs": ["create", "update", "patch", "delete", "deletecollection", "get", "list"]},
    ],
}


@dataclass(frozen=True)
class Ports:
    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int


def etcd_args(data_dir: Path, ports: Ports) -> list[str]:
    return [
        "--name=omni", f"--data-dir={data_dir}",
        f"--listen-client-urls=http://127.0.0.1:{ports.etcd}",
        f"--advertise-client-urls=http://127.0.0.1:{ports.etcd}",
        f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
        f"--initial-cluster=omni=http://127.0.0.1:{ports.etcd_peer}",
        "--initial-cluster-state=new",
        "--unsafe-no-fsync",  # throwaway data: no fsync, much faster on slow disks
        "--quota-backend-bytes=2147483648",
        "--snapshot-count=10000",
        "--log-level=warn",
    ]


def apiserver_args(pki: Pki, ports: Ports, cert_dir: Path, audit_policy: Path | None, audit_log: Path
                   ) -> list[str]:
    audit = [f"--audit-policy-file={audit_policy}", f"--audit-log-path={audit_log}", "--audit-log-format=json",
             "--audit-log-mode=blocking"] if audit_policy else []
    return [
        f"--etcd-servers=http://127.0.0.1:{ports.etcd}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports.apiserver}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.path('apiserver.crt')}", f"--tls-private-key-file={pki.path('apiserver.key')}",
        f"--client-ca-file={pki.path('ca.crt')}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.path('sa.pub')}",
        f"--service-account-signing-key-file={pki.path('sa.key')}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
        *audit,
    ]


def controller_manager_args(kubeconfig: Path, pki: Pki, ports: Ports, cert_dir: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={ports.controller_manager}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.path('sa.key')}",
        f"--root-ca-file={pki.path('ca.crt')}",
        f"--cluster-signing-cert-file={pki.path('ca.crt')}",
        f"--cluster-signing-key-file={pki.path('ca.key')}",
        f"--cluster-name={CLUSTER_NAME}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--controllers=*",
        # Fake nodes never fail; a long grace keeps a slow machine's hiccups from flipping them.
        "--node-monitor-grace-period=5m",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_args(kubeconfig: Path, ports: Ports, cert_dir: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1", f"--secure-port={ports.scheduler}",
        f"--cert-dir={cert_dir}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def kwok_args(kubeconfig: Path, stages: Path) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        f"--config={stages}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL[0]}={KWOK_NODE_LABEL[1]}",
        f"--cidr={POD_CIDR}",
        f"--node-ip={NODE_IP}",
        # Keep node Leases renewed: without heartbeats the node lifecycle controller marks
        # the fake nodes NotReady (and their pods not ready) after its grace period.
        "--node-lease-duration-seconds=40",
    ]


def etcd_healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
    finally:
        conn.close()


def component_healthy(port: int) -> bool:
    """/healthz of kube-controller-manager or kube-scheduler."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certificate of the component
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read().strip() == b"ok"
    finally:
        conn.close()

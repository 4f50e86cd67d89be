"""What the operator benchmark reads from the cluster and the machine: /proc samples, the
apiserver's audit log and metrics, watches that record convergence, and the operator's
own service account."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from e2e.cluster import LocalCluster
from e2e.operator_process import OperatorProcess
from omni_operator.api.resource import GROUP, KIND, PLURAL, VERSION
from omni_operator.controller import rbac
from omni_operator.rendering.meta import MANAGER

OPERATOR_NAMESPACE = "omni-bench-system"
OPERATOR_ACCOUNT = "omni-operator"

# kind -> watch path under /namespaces/<ns>; the children are the operator's, by label.
CHILD_PATHS = {
    "StatefulSet": "/apis/apps/v1/namespaces/{ns}/statefulsets",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Service": "/api/v1/namespaces/{ns}/services",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
}
OMNI_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_QUERY = f"&labelSelector=app.kubernetes.io/managed-by%3D{MANAGER}"


@dataclass(frozen=True)
class ProcSample:
    """A process's resident memory and CPU seconds so far, from /proc."""

    rss_mib: float
    cpu_s: float

    @classmethod
    def of(cls, pid: int) -> "ProcSample":
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        return cls(rss_kib / 1024, (utime + stime) / os.sysconf("SC_CLK_TCK"))


@dataclass
class Interval:
    """What happened between two snapshots."""

    seconds: float
    operator_cpu_s: float
    operator_rss_mib: float  # at the end
    machine_busy: float  # share of all cores busy, 0..1
    reconciles: int
    reconcile_s: float  # summed over reconciles


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def operator_reconciles(op: OperatorProcess) -> tuple[int, float]:
    """(reconciles, seconds spent in them) from the operator's /metrics."""
    text = op.metrics()
    count = sum(float(v) for v in re.findall(r"^omni_operator_reconcile_total\{[^}]*\} (\S+)$", text, re.M))
    seconds = re.search(r"^omni_operator_reconcile_duration_seconds_sum (\S+)$", text, re.M)
    return int(count), float(seconds.group(1)) if seconds else 0.0


def apiserver_reads(cluster: LocalCluster) -> Counter[str]:
    """'VERB resource' -> requests served so far, GET and LIST only (all clients)."""
    status, text = cluster.api("GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"apiserver /metrics: HTTP {status}")
    counts: Counter[str] = Counter()
    for labels, value in re.findall(r"^apiserver_request_total\{([^}]*)\} (\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("verb") in ("GET", "LIST") and fields.get("resource"):
            sub = f"/{fields['subresource']}" if fields.get("subresource") else ""
            counts[f"{fields['verb']} {fields['resource']}{sub}"] += int(float(value))
    return counts


@dataclass(frozen=True)
class Snapshot:
    at: float
    operator: ProcSample
    machine_busy_s: float
    reconciles: int
    reconcile_s: float

    @classmethod
    def take(cls, op: OperatorProcess) -> "Snapshot":
        reconciles, reconcile_s = operator_reconciles(op)
        return cls(time.monotonic(), ProcSample.of(op.proc.pid), machine_busy_seconds(), reconciles, reconcile_s)

    def until(self, later: "Snapshot") -> Interval:
        seconds = later.at - self.at
        return Interval(seconds=seconds, operator_cpu_s=later.operator.cpu_s - self.operator.cpu_s,
                        operator_rss_mib=later.operator.rss_mib,
                        machine_busy=(later.machine_busy_s - self.machine_busy_s) / (seconds * (os.cpu_count() or 1)),
                        reconciles=later.reconciles - self.reconciles, reconcile_s=later.reconcile_s - self.reconcile_s)


WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
READ_VERBS = ("get", "list")


class AuditLog:
    """The operator's requests in the apiserver's audit log, read by byte offset."""

    def __init__(self, path: Path, user: str):
        self.path = path
        self.user = user

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def writes_since(self, offset: int, where: Callable[[dict], bool] = lambda e: True) -> Counter[str]:
        """'verb resource[/subresource]' -> count; failed requests get their HTTP code appended."""
        return self._since(offset, lambda e: e.get("verb") in WRITE_VERBS and where(e))

    def reads_since(self, offset: int) -> Counter[str]:
        return self._since(offset, lambda e: e.get("verb") in READ_VERBS)

    def _since(self, offset: int, where: Callable[[dict], bool]) -> Counter[str]:
        counts: Counter[str] = Counter()
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                event = json.loads(line)
                if event.get("user", {}).get("username") != self.user or not where(event):
                    continue
                ref = event.get("objectRef", {})
                resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                code = event.get("responseStatus", {}).get("code", 0)
                counts[f"{event['verb']} {resource}" + (f" ({code})" if code >= 400 else "")] += 1
        return counts


class Api:
    """Raw HTTPS to the apiserver with the admin certificate."""

    def __init__(self, cluster: LocalCluster):
        self.port = int(cluster.server.rsplit(":", 1)[1])
        self.ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
        self.ctx.load_cert_chain(str(cluster.pki.path("admin.crt")), str(cluster.pki.path("admin.key")))

    def watch(self, path: str, query: str = "") -> tuple[http.client.HTTPSConnection, Iterator[dict]]:
        """A watch that is registered when this returns, and its events."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx)
        conn.request("GET", f"{path}?watch=1&timeoutSeconds=1800{query}", headers={"Accept": "application/json"})
        resp = conn.getresponse()  # the headers come once the watch is registered
        if resp.status != 200:
            raise RuntimeError(f"watch {path}: HTTP {resp.status} {resp.read()[:300]!r}")
        return conn, (json.loads(line) for line in resp if line.strip())


class Watches:
    """Watch streams read on daemon threads: `on_event(kind, event, received)` under `lock`;
    an error before stop() is kept in `error` and `lock` is notified."""

    def __init__(self, api: Api, paths: dict[str, str], on_event: Callable[[str, dict, float], None],
                 lock: threading.Condition):
        self.lock = lock
        self.error: Exception | None = None
        self._on_event = on_event
        self._stopped = False
        self._conns: list[http.client.HTTPSConnection] = []
        for kind, path in paths.items():
            query = "" if kind == KIND else MANAGED_QUERY
            conn, events = api.watch(path, query)
            self._conns.append(conn)
            threading.Thread(target=self._follow, args=(kind, events), daemon=True, name=f"watch-{kind}").start()

    def _follow(self, kind: str, events: Iterator[dict]) -> None:
        try:
            for event in events:
                with self.lock:
                    self._on_event(kind, event, time.monotonic())
        except Exception as err:  # noqa: BLE001 - a closed connection, unless it happened before stop()
            with self.lock:
                if not self._stopped:
                    self.error = err
                    self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self._stopped = True
        for conn in self._conns:
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            conn.close()


class ConvergenceWatch:
    """Watches one namespace; records per OmniDeployment when all its children had appeared,
    when its status was first written for its generation, and so when it was done."""

    def __init__(self, api: Api, namespace: str, expected: dict[str, set[tuple[str, str]]]):
        self.namespace = namespace
        self.expected = expected
        self.children: dict[str, set[tuple[str, str]]] = {name: set() for name in expected}
        self.children_at: dict[str, float] = {}
        self.status_at: dict[str, float] = {}
        self.done_at: dict[str, float] = {}
        self.conditions: dict[str, dict[str, str]] = {}
        self._cond = threading.Condition()
        paths = {kind: path.format(ns=namespace) for kind, path in {KIND: OMNI_PATH, **CHILD_PATHS}.items()}
        self._watches = Watches(api, paths, self._observe, self._cond)

    def _observe(self, kind: str, event: dict, now: float) -> None:
        if event["type"] not in ("ADDED", "MODIFIED"):
            return
        obj = event["object"]
        meta = obj["metadata"]
        if kind == KIND:
            name, status = meta["name"], obj.get("status") or {}
            if status.get("conditions") and status.get("observedGeneration") == meta.get("generation"):
                self.status_at.setdefault(name, now)
                self.conditions[name] = {c["type"]: c["status"] for c in status["conditions"]}
        else:
            name = meta.get("labels", {}).get(INSTANCE_LABEL, "")
            if name not in self.children:
                return
            self.children[name].add((kind, meta["name"]))
            if self.expected[name] <= self.children[name]:
                self.children_at.setdefault(name, now)
        if name in self.status_at and name in self.children_at and name not in self.done_at:
            self.done_at[name] = max(self.status_at[name], self.children_at[name])
            self._cond.notify_all()

    def child_count(self) -> int:
        with self._cond:
            return sum(len(c) for c in self.children.values())

    def wait_all_done(self, timeout: float) -> float:
        """The moment the last object was done."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.done_at) == len(self.expected) or self._watches.error,
                                       timeout):
                raise TimeoutError(f"{len(self.done_at)}/{len(self.expected)} done in {self.namespace} "
                                   f"after {timeout:.0f}s")
            if self._watches.error:
                raise RuntimeError(f"a watch in {self.namespace} broke: {self._watches.error!r}")
            return max(self.done_at.values())

    def stop(self) -> None:
        self._watches.stop()


class WorkloadActivity:
    """Changes of the operator's StatefulSets and Deployments in every namespace. Their status
    follows their pods, and the operator's status follows theirs: while they change, the
    operator has real work; once they and the operator's writes stop, the cluster has settled."""

    PATHS = {"StatefulSet": "/apis/apps/v1/statefulsets", "Deployment": "/apis/apps/v1/deployments"}

    def __init__(self, api: Api):
        self.events = 0
        self.last = time.monotonic()
        self._watches = Watches(api, self.PATHS, self._observe, threading.Condition())

    def _observe(self, kind: str, event: dict, now: float) -> None:
        self.events += 1
        self.last = now

    def check(self) -> None:
        if self._watches.error:
            raise RuntimeError(f"the workload watch broke: {self._watches.error!r}")

    def stop(self) -> None:
        self._watches.stop()


# ----------------------------------------------------------------------------- the operator


@dataclass
class OperatorAccount:
    """What OperatorProcess takes from a cluster (`env`), with the operator's own kubeconfig."""

    env: dict[str, str]


def operator_account(cluster: LocalCluster) -> OperatorAccount:
    """A service account bound to the operator's RBAC rules, and a kubeconfig with its token."""
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    cluster.kubectl("create", "serviceaccount", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "omni-bench-operator"}, "rules": rbac.rules()}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "omni-bench-operator"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "omni-bench-operator"},
               "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": OPERATOR_NAMESPACE}]}
    cluster.apply(role, binding)
    token = cluster.kubectl("create", "token", OPERATOR_ACCOUNT, "-n", OPERATOR_NAMESPACE,
                            "--duration=2h").stdout.strip()
    config = json.loads(cluster.kubeconfig.read_text())
    config["users"] = [{"name": OPERATOR_ACCOUNT, "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = OPERATOR_ACCOUNT
    path = cluster.state_dir / "operator.kubeconfig"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return OperatorAccount(env=dict(cluster.env, KUBECONFIG=str(path)))


def log_errors(op: OperatorProcess) -> tuple[int, int]:
    """(failed reconciles, other ERROR lines) in the operator's log."""
    text = op.log_file.read_text(errors="replace")
    failed = len(re.findall(r"reconcile of \S+ failed", text))
    return failed, len(re.findall(r" (?:ERROR|CRITICAL) ", text)) - failed

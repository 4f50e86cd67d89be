"""Scale benchmark of the operator against the real local control plane (e2e.cluster).

    python -m bench.operator_bench [--counts 1,50,200] [--restart-count 50] [--state-dir DIR]

Figures:
1. Reconcile latency: N OmniDeployments created by one server-side apply (a fresh
   namespace per N); per object, the first moment all its children exist and its status
   is written for its generation (observedGeneration == generation, conditions present),
   measured from the start of the apply with API watches. p50/p99/max per N.
2. API writes of a no-op reconcile: the apiserver's audit log of the operator's
   service account, counted by verb and resource over a quiet period that holds the
   operator's 60 s resync of every object. The expected count is 0.
3. Operator memory (VmRSS, /proc/<pid>/status) and CPU seconds (utime+stime,
   /proc/<pid>/stat) after the largest burst and over the quiet period.
4. Convergence after SIGKILL mid-reconcile: apply a batch, kill the operator once the
   first children appear, start it again, time until every object of the batch is done.

The operator runs as `omni-operator run --all-namespaces` under a service account bound
to its own RBAC rules (omni_operator.rbac), so its requests are the ones audited.
A state dir given with --state-dir is kept (logs/audit.log, logs/operator.log);
the default is a temporary one, deleted at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import shlex
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from e2e.cluster import LocalCluster
from e2e.operator_process import OperatorProcess, install_crd
from omni_operator import rbac
from omni_operator.api import GROUP, KIND, PLURAL, VERSION
from omni_operator.main import RESYNC_SECONDS
from omni_operator.plan import plan_offline
from omni_operator.render import MANAGER

OPERATOR_NAMESPACE = "omni-bench-system"
OPERATOR_ACCOUNT = "omni-operator"
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"

# Small on purpose: one thinker replica and one gateway pod, no talker. Most thinker pods of
# a large batch stay Pending (the fake pools hold 2x8 + 2x4 GPUs); the figures are about
# the operator creating children and writing status, not about pods. The weights are on a
# user's volume: a weight cache per object would measure the loaders, not the operator.
SPEC: dict[str, Any] = {
    "variant": "Thinking",
    "model": {"pvc": {"claimName": "qwen3-omni-weights"}},
    "workload": {"maxVideoSeconds": 15},
    "thinker": {"gpu": {"memoryGiB": 80, "countPerNode": 8},
                "nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "thinker"}},
                "minReplicas": 1, "maxReplicas": 1},
    "gateway": {"nodePool": {"nodeSelector": {"omni.qwen.ai/pool": "cpu"}}, "minReplicas": 1, "maxReplicas": 1},
}
SPEC_SUMMARY = ("variant Thinking, 15 s video, thinker 1 replica, gateway minReplicas 1 (no talker), "
                "weights on a user PVC")

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
KILL_AFTER_CHILDREN = 5
QUIET_SECONDS = RESYNC_SECONDS + 5  # always holds one resync of every object
SETTLE_SECONDS = 10.0  # no workload change and no operator write for this long: settled


# ----------------------------------------------------------------------------- results


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


@dataclass
class BurstResult:
    count: int
    apply_s: float
    p50_s: float
    p99_s: float
    max_s: float
    until_done: Interval  # from the start of the apply to the last object done
    until_settled: Interval  # from the start of the apply until the operator stopped writing
    writes: Counter[str]  # operator API writes in that interval


@dataclass
class QuietResult:
    objects: int
    interval: Interval
    writes: Counter[str]
    reads: Counter[str]  # the apiserver's GET/LIST requests from all clients, by resource
    workload_changes: int  # watch events of the operator's StatefulSets and Deployments


@dataclass
class RestartResult:
    count: int
    children_at_kill: int
    done_at_kill: int
    healthy_s: float  # from the restart to /healthz answering
    converge_s: float  # from the restart to every object of the batch done
    since_kill_s: float
    operator: ProcSample  # of the new process when all were done (its CPU counts from its start)
    writes_elsewhere: Counter[str]  # writes to the objects that had converged before the kill


@dataclass
class BenchResult:
    cores: int
    kubernetes: str
    load_at_start: float
    command: str
    children_per_object: int
    first_object_s: float = 0.0  # latency of the first object after the operator started (not in the bursts)
    bursts: list[BurstResult] = field(default_factory=list)
    quiet: QuietResult | None = None
    restart: RestartResult | None = None
    failed_reconciles: int = 0
    log_errors: int = 0


# ----------------------------------------------------------------------------- helpers


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


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


class AuditLog:
    """The operator's write requests in the apiserver's audit log, read by byte offset."""

    def __init__(self, path: Path, user: str):
        self.path = path
        self.user = user

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def writes_since(self, offset: int, where: Callable[[dict], bool] = lambda e: True) -> Counter[str]:
        """'verb resource[/subresource]' -> count; failed requests get their HTTP code appended."""
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
            "metadata": {"name": "omni-bench-operator"}, "rules": rbac.RULES}
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


# ----------------------------------------------------------------------------- scenarios


class Bench:
    def __init__(self, cluster: LocalCluster, op: OperatorProcess, audit: AuditLog):
        self.cluster = cluster
        self.op = op
        self.audit = audit
        self.api = Api(cluster)
        self.activity = WorkloadActivity(self.api)
        self.objects = 0

    def close(self) -> None:
        self.activity.stop()

    def wait_settled(self, quiet: float = SETTLE_SECONDS, timeout: float = 240.0) -> None:
        """Until neither the operator's workloads nor its writes have changed for `quiet` seconds."""
        size, grown = self.audit.mark(), time.monotonic()
        deadline = grown + timeout
        while time.monotonic() - max(grown, self.activity.last) < quiet:
            self.activity.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workloads or the operator's writes kept changing for {timeout:.0f}s")
            time.sleep(0.25)
            if (current := self.audit.mark()) != size:
                size, grown = current, time.monotonic()

    def namespace(self, name: str) -> str:
        self.cluster.kubectl("create", "namespace", name)
        wait_until(f"service account default in {name}",
                   lambda: self.cluster.api("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
                   timeout=60)
        return name

    def batch(self, namespace: str, count: int) -> tuple[list[dict], ConvergenceWatch]:
        """The objects of a batch and a watch on their namespace, established before they exist."""
        resources = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                      "metadata": {"name": f"omni-{i:03d}", "namespace": namespace}, "spec": SPEC}
                     for i in range(count)]
        expected = {r["metadata"]["name"]: {(o["kind"], o["metadata"]["name"]) for o in plan_offline(r).objects}
                    for r in resources}
        assert {kind for names in expected.values() for kind, _ in names} <= set(CHILD_PATHS)
        self.objects += count
        return resources, ConvergenceWatch(self.api, namespace, expected)

    def burst(self, count: int, namespace: str | None = None) -> BurstResult:
        namespace = self.namespace(namespace or f"omni-bench-{count}")
        resources, watch = self.batch(namespace, count)
        mark, before = self.audit.mark(), Snapshot.take(self.op)
        started = time.monotonic()
        self.cluster.apply(*resources)
        applied = time.monotonic()
        try:
            last = watch.wait_all_done(timeout=120 + count)
        finally:
            watch.stop()
        done = Snapshot.take(self.op)
        self.wait_settled()
        settled = Snapshot.take(self.op)
        invalid = [n for n, c in watch.conditions.items() if c.get("SizingValid") != "True"]
        if invalid:
            raise RuntimeError(f"SizingValid is not True for {invalid[:5]}: {watch.conditions[invalid[0]]}")
        latencies = [t - started for t in watch.done_at.values()]
        return BurstResult(count=count, apply_s=applied - started, p50_s=percentile(latencies, 50),
                           p99_s=percentile(latencies, 99), max_s=last - started, until_done=before.until(done),
                           until_settled=before.until(settled), writes=self.audit.writes_since(mark))

    def quiet(self) -> QuietResult:
        self.wait_settled()
        mark, reads, before = self.audit.mark(), apiserver_reads(self.cluster), Snapshot.take(self.op)
        workload_events = self.activity.events
        time.sleep(QUIET_SECONDS)
        after = Snapshot.take(self.op)
        return QuietResult(objects=self.objects, interval=before.until(after), writes=self.audit.writes_since(mark),
                           reads=apiserver_reads(self.cluster) - reads,
                           workload_changes=self.activity.events - workload_events)

    def restart(self, count: int) -> RestartResult:
        self.wait_settled()
        namespace = self.namespace("omni-bench-restart")
        resources, watch = self.batch(namespace, count)
        mark = self.audit.mark()
        try:
            applying = threading.Thread(target=self.cluster.apply, args=resources)
            applying.start()
            wait_until(f"{KILL_AFTER_CHILDREN} children", lambda: watch.child_count() >= KILL_AFTER_CHILDREN,
                       timeout=60, interval=0.01)
            self.op.kill()
            killed = time.monotonic()
            children_at_kill, done_at_kill = watch.child_count(), len(watch.done_at)
            applying.join()
            restarted = time.monotonic()
            self.op.start()
            healthy = time.monotonic()
            last = watch.wait_all_done(timeout=120 + 2 * count)
            operator = ProcSample.of(self.op.proc.pid)
        finally:
            watch.stop()
        elsewhere = self.audit.writes_since(mark, lambda e: e.get("objectRef", {}).get("namespace") != namespace)
        return RestartResult(count=count, children_at_kill=children_at_kill, done_at_kill=done_at_kill,
                             healthy_s=healthy - restarted, converge_s=last - restarted,
                             since_kill_s=last - killed, operator=operator, writes_elsewhere=elsewhere)


# ----------------------------------------------------------------------------- report


def _writes(counts: Counter[str]) -> str:
    if not counts:
        return "0"
    return f"{sum(counts.values())} (" + ", ".join(f"{k}: {v}" for k, v in counts.most_common()) + ")"


WRITE_KINDS = {"children": ("statefulsets", "deployments", "services", "poddisruptionbudgets"),
               "status": ("omnideployments/status",), "events": ("events",)}


def writes_per_object(counts: Counter[str], objects: int) -> dict[str, float]:
    """Writes per object by what was written: children, status, events, other."""
    out = dict.fromkeys([*WRITE_KINDS, "other"], 0.0)
    for key, n in counts.items():
        resource = key.split()[1]
        kind = next((k for k, resources in WRITE_KINDS.items() if resource in resources), "other")
        out[kind] += n / objects
    return out


def report(r: BenchResult) -> str:
    lines = [
        f"operator scale benchmark: {r.cores} cores, Kubernetes {r.kubernetes}, "
        f"1-min load average at start {r.load_at_start:.2f}",
        f"spec: {SPEC_SUMMARY}; {r.children_per_object} children per OmniDeployment",
        "latency: from the start of one server-side apply of N objects (fresh namespace) to the object's "
        "children all present and its status written for its generation",
        "writes/obj, reconciles/obj: until the operator's workloads and writes stopped changing; "
        "op CPU, op RSS, machine busy: up to the last object done",
        "",
        f"{'N':>5} {'apply s':>8} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'writes/obj':>10} "
        f"{'(children status events other)':>31} {'reconciles/obj':>14} {'ms each':>8} {'op CPU s':>9} "
        f"{'op RSS MiB':>11} {'machine busy':>12}",
    ]
    for b in r.bursts:
        w, i, settled = writes_per_object(b.writes, b.count), b.until_done, b.until_settled
        breakdown = f"({w['children']:.1f} {w['status']:.1f} {w['events']:.1f} {w['other']:.1f})"
        lines.append(f"{b.count:>5} {b.apply_s:>8.2f} {b.p50_s:>7.2f} {b.p99_s:>7.2f} {b.max_s:>7.2f} "
                     f"{sum(w.values()):>10.1f} {breakdown:>31} {settled.reconciles / b.count:>14.1f} "
                     f"{1000 * settled.reconcile_s / max(settled.reconciles, 1):>8.0f} {i.operator_cpu_s:>9.1f} "
                     f"{i.operator_rss_mib:>11.1f} {i.machine_busy:>11.0%}")
    rows: list[tuple[str, str]] = [("first object after the operator started (before the bursts) s",
                                    f"{r.first_object_s:.2f}")]
    if r.quiet:
        q, i = r.quiet, r.quiet.interval
        top_reads = ", ".join(f"{k} {v / i.seconds:.1f}" for k, v in q.reads.most_common(4))
        rows += [
            (f"quiet period ({q.objects} objects, {i.seconds:.0f} s, includes the {RESYNC_SECONDS:.0f} s resync)",
             f"{i.reconciles} reconciles, {1000 * i.reconcile_s / max(i.reconciles, 1):.0f} ms each"),
            ("  operator API writes (expected 0)", _writes(q.writes)),
            ("  changes of the operator's workloads meanwhile (expected 0)", str(q.workload_changes)),
            ("  operator CPU s (share of one core)", f"{i.operator_cpu_s:.1f} ({i.operator_cpu_s / i.seconds:.1%})"),
            ("  operator RSS MiB at the end", f"{i.operator_rss_mib:.1f}"),
            ("  apiserver reads/s, all clients (top 4)", top_reads),
            ("  machine busy (all cores)", f"{i.machine_busy:.0%}"),
        ]
    if r.restart:
        s = r.restart
        rows += [
            (f"SIGKILL after {s.children_at_kill} children of a new batch of {s.count}",
             f"{s.done_at_kill}/{s.count} done at the kill"),
            ("  restart -> /healthz s", f"{s.healthy_s:.2f}"),
            (f"  restart -> all {s.count} done s (from the kill)", f"{s.converge_s:.2f} ({s.since_kill_s:.2f})"),
            ("  new operator by then: CPU s since its start, RSS MiB",
             f"{s.operator.cpu_s:.1f}, {s.operator.rss_mib:.1f}"),
            ("  writes to objects converged before the kill", _writes(s.writes_elsewhere)),
        ]
    rows.append(("operator log: failed reconciles, other ERROR lines", f"{r.failed_reconciles}, {r.log_errors}"))
    width = max(len(k) for k, _ in rows)
    lines += [""] + [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", f"reproduce: {r.command}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,50,200", help="batch sizes, comma separated (default 1,50,200)")
    parser.add_argument("--restart-count", type=int, default=50, help="batch size of the SIGKILL run; 0 skips it")
    parser.add_argument("--state-dir", type=Path, default=None, help="cluster state and logs, kept afterwards")
    args = parser.parse_args(argv)
    counts = list(dict.fromkeys(int(c) for c in args.counts.split(",") if c.strip()))  # a namespace each
    command = shlex.join(["python", "-m", "bench.operator_bench", *(argv if argv is not None else sys.argv[1:])])

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="omni-operator-bench-"))
    cluster = LocalCluster(state_dir, audit=True, die_with_parent=True)
    cluster.start(timeout=240)
    try:
        install_crd(cluster)
        op = OperatorProcess(operator_account(cluster), state_dir / "logs" / "operator.log", "--all-namespaces")
        op.start()
        try:
            wait_until("the operator ready", op.ready, timeout=60)
            result = run(cluster, op, counts, args.restart_count, command)
        finally:
            op.stop()
        print(report(result), flush=True)
    finally:
        cluster.stop()
        if args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def run(cluster: LocalCluster, op: OperatorProcess, counts: list[int], restart_count: int,
        command: str) -> BenchResult:
    sample = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"}, "spec": SPEC}
    result = BenchResult(cores=os.cpu_count() or 0, kubernetes=cluster.api("GET", "/version")[1]["gitVersion"],
                         load_at_start=os.getloadavg()[0], command=command,
                         children_per_object=len(plan_offline(sample).objects))
    bench = Bench(cluster, op, AuditLog(cluster.audit_log, OPERATOR_USER))
    try:
        progress("first object after the operator's start")
        result.first_object_s = bench.burst(1, "omni-bench-first").max_s
        for count in counts:
            progress(f"burst of {count}")
            result.bursts.append(bench.burst(count))
        progress(f"quiet period of {QUIET_SECONDS:.0f} s")
        result.quiet = bench.quiet()
        if restart_count:
            progress(f"SIGKILL and restart with {restart_count} new objects")
            result.restart = bench.restart(restart_count)
    finally:
        bench.close()
    result.failed_reconciles, result.log_errors = log_errors(op)
    return result


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

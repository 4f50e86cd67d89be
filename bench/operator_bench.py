"""Scale benchmark of the operator against the real local control plane (e2e.cluster).

    python -m bench.operator_bench [--counts 1,50,200] [--rounds 1] [--restart-count 50] [--state-dir DIR]

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
5. The physical limit (--direct-count): the same children and statuses of N objects written
   by a plain client with no operator running (bench/direct_apply.py), once before the
   operator starts and once right after each burst of the same N (the operator stopped
   meanwhile). Each burst's ratio divides its p99 by the mean of the two baseline p99s around
   it; with --rounds R the burst of that N and the baseline after it run R times (each in a
   fresh namespace), and the last line gives every round's ratio and their median: the
   machine's pace drifts from minute to minute, one pair says less than several.

The operator runs as `omni-operator run --all-namespaces` under a service account bound
to its own RBAC rules (omni_operator.controller.rbac), so its requests are the ones audited.
A state dir given with --state-dir is kept (logs/audit.log, logs/operator.log);
the default is a temporary one, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import direct_apply
from bench.operator_bench_cluster import (CHILD_PATHS, OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, Api, AuditLog,
                                          ConvergenceWatch, Interval, ProcSample, Snapshot, WorkloadActivity,
                                          apiserver_reads, log_errors, operator_account, percentile)
from e2e.cluster import LocalCluster
from e2e.operator_process import OperatorProcess, install_crd
from e2e.procs import wait_until
from omni_operator.api.resource import GROUP, KIND, PLURAL, VERSION
from omni_operator.controller.reconciler import RESYNC_SECONDS
from omni_operator.rendering.plan import plan_offline

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

KILL_AFTER_CHILDREN = 5
QUIET_SECONDS = RESYNC_SECONDS + 5  # always holds one resync of every object
SETTLE_SECONDS = 10.0  # no workload change and no operator write for this long: settled


# ----------------------------------------------------------------------------- results


@dataclass
class BurstResult:
    count: int
    round: int
    apply_s: float
    p50_s: float
    p99_s: float
    max_s: float
    until_done: Interval  # from the start of the apply to the last object done
    until_settled: Interval  # from the start of the apply until the operator stopped writing
    writes: Counter[str]  # operator API writes in that interval
    reads: Counter[str] = field(default_factory=Counter)  # operator GET/LIST requests in that interval


@dataclass
class DirectResult:
    """The same children and statuses written by a plain client, no operator (bench/direct_apply.py)."""
    count: int
    p50_s: float
    p99_s: float
    max_s: float


@dataclass
class QuietResult:
    objects: int
    interval: Interval
    writes: Counter[str]
    reads: Counter[str]  # the apiserver's GET/LIST requests from all clients, by resource
    workload_changes: int  # watch events of the operator's StatefulSets and Deployments
    operator_reads: Counter[str] = field(default_factory=Counter)  # the operator's own GET/LIST (audit log)


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
    # the plain-client baseline before the operator starts and right after the burst of the same
    # N: the two bracket the burst, as the machine's pace drifts over a run
    directs: list[DirectResult] = field(default_factory=list)
    quiet: QuietResult | None = None
    restart: RestartResult | None = None
    failed_reconciles: int = 0
    log_errors: int = 0


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
        mark, writes, grown = self.audit.mark(), 0, time.monotonic()
        deadline = grown + timeout
        while time.monotonic() - max(grown, self.activity.last) < quiet:
            self.activity.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workloads or the operator's writes kept changing for {timeout:.0f}s")
            time.sleep(0.25)
            # the audit log also holds the operator's reads (the autoscaler lists pods): count writes
            if (current := sum(self.audit.writes_since(mark).values())) != writes:
                writes, grown = current, time.monotonic()

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

    def burst(self, count: int, namespace: str | None = None, round_: int = 1) -> BurstResult:
        namespace = self.namespace(namespace or f"omni-bench-{count}" + (f"-{round_}" if round_ > 1 else ""))
        resources, watch = self.batch(namespace, count)
        mark, before = self.audit.mark(), Snapshot.take(self.op)
        started = time.monotonic()
        self.cluster.apply(*resources, timeout=120 + count)  # one request per object, on a busy apiserver
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
        return BurstResult(count=count, round=round_, apply_s=applied - started, p50_s=percentile(latencies, 50),
                           p99_s=percentile(latencies, 99), max_s=last - started, until_done=before.until(done),
                           until_settled=before.until(settled), writes=self.audit.writes_since(mark),
                           reads=self.audit.reads_since(mark))

    def direct(self, count: int, when: str) -> DirectResult:
        """The same N objects with their children and statuses written by a plain client while
        no operator runs (its namespace is deleted afterwards)."""
        namespace = self.namespace(f"omni-direct-{when}-{count}")
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
        wait_until("the CRD served", lambda: self.cluster.api("GET", path)[0] == 200, timeout=60)
        resources, watch = self.batch(namespace, count)
        self.objects -= count  # gone again before the operator starts
        started = time.monotonic()
        try:
            self.cluster.apply(*resources)
            direct_apply.write_all(str(self.cluster.kubeconfig), namespace,
                                   [r["metadata"]["name"] for r in resources])
            last = watch.wait_all_done(timeout=120 + count)
        finally:
            watch.stop()
        latencies = [t - started for t in watch.done_at.values()]
        self.cluster.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=300s")
        return DirectResult(count=count, p50_s=percentile(latencies, 50), p99_s=percentile(latencies, 99),
                            max_s=last - started)

    def quiet(self) -> QuietResult:
        self.wait_settled()
        mark, reads, before = self.audit.mark(), apiserver_reads(self.cluster), Snapshot.take(self.op)
        workload_events = self.activity.events
        time.sleep(QUIET_SECONDS)
        after = Snapshot.take(self.op)
        return QuietResult(objects=self.objects, interval=before.until(after), writes=self.audit.writes_since(mark),
                           reads=apiserver_reads(self.cluster) - reads,
                           workload_changes=self.activity.events - workload_events,
                           operator_reads=self.audit.reads_since(mark))

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
        f"{'N':>5} {'round':>5} {'apply s':>8} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'writes/obj':>10} "
        f"{'(children status events other)':>31} {'reads/obj':>9} {'reconciles/obj':>14} {'ms each':>8} "
        f"{'op CPU s':>9} {'op RSS MiB':>11} {'machine busy':>12}",
    ]
    for b in r.bursts:
        w, i, settled = writes_per_object(b.writes, b.count), b.until_done, b.until_settled
        breakdown = f"({w['children']:.1f} {w['status']:.1f} {w['events']:.1f} {w['other']:.1f})"
        lines.append(f"{b.count:>5} {b.round:>5} {b.apply_s:>8.2f} {b.p50_s:>7.2f} {b.p99_s:>7.2f} {b.max_s:>7.2f} "
                     f"{sum(w.values()):>10.1f} {breakdown:>31} {sum(b.reads.values()) / b.count:>9.1f} "
                     f"{settled.reconciles / b.count:>14.1f} "
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
    if r.quiet:
        rows.append(("  operator API reads (expected 0: pods and children come from watches)",
                     _writes(r.quiet.operator_reads)))
    rows.append(("operator log: failed reconciles, other ERROR lines", f"{r.failed_reconciles}, {r.log_errors}"))
    direct_count = r.directs[0].count if r.directs else None
    compared = [b for b in r.bursts if b.count == direct_count]
    for i, d in enumerate(r.directs):
        when = "before the operator started" if i == 0 else f"after burst round {i}, operator stopped"
        rows.append((f"baseline {when}: {d.count} objects, same children and statuses, plain client",
                     f"p50 {d.p50_s:.2f} s, p99 {d.p99_s:.2f} s, max {d.max_s:.2f} s"))
    width = max(len(k) for k, _ in rows)
    lines += [""] + [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", f"reproduce: {r.command}"]
    if compared and len(r.directs) > len(compared):
        # each burst against the two baselines around it: the one before it and the one right after
        ratios = [b.p99_s / ((r.directs[i].p99_s + r.directs[i + 1].p99_s) / 2) for i, b in enumerate(compared)]
        reads = sum(sum(b.reads.values()) for b in compared) / sum(b.count for b in compared)
        lines.append(f"ratio: operator p99 / direct p99 (mean of the baselines before and after the burst) for "
                     f"N={direct_count}: {', '.join(f'{x:.2f}' for x in ratios)} over {len(ratios)} round(s), "
                     f"median {statistics.median(ratios):.2f} (goal <= 1.5); operator reads per object {reads:.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.operator_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="1,50,200", help="batch sizes, comma separated (default 1,50,200)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="bursts of the --direct-count N, each followed by a baseline (default 1)")
    parser.add_argument("--restart-count", type=int, default=50, help="batch size of the SIGKILL run; 0 skips it")
    parser.add_argument("--state-dir", type=Path, default=None, help="cluster state and logs, kept afterwards")
    parser.add_argument("--direct-count", type=int, default=200,
                        help="batch size of the no-operator baseline (the same writes by a plain client); 0 skips it")
    args = parser.parse_args(argv)
    counts = list(dict.fromkeys(int(c) for c in args.counts.split(",") if c.strip()))  # a namespace each
    command = shlex.join(["python", "-m", "bench.operator_bench", *(argv if argv is not None else sys.argv[1:])])

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="omni-operator-bench-"))
    cluster = LocalCluster(state_dir, audit=True, die_with_parent=True)
    cluster.start(timeout=240)
    try:
        install_crd(cluster)
        op = OperatorProcess(operator_account(cluster), state_dir / "logs" / "operator.log", "--all-namespaces")
        try:
            result = run(cluster, op, counts, args.restart_count, command, args.direct_count, args.rounds)
        finally:
            op.stop()
        print(report(result), flush=True)
    finally:
        cluster.stop()
        if args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def run(cluster: LocalCluster, op: OperatorProcess, counts: list[int], restart_count: int,
        command: str, direct_count: int = 0, rounds: int = 1) -> BenchResult:
    sample = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"}, "spec": SPEC}
    result = BenchResult(cores=os.cpu_count() or 0, kubernetes=cluster.api("GET", "/version")[1]["gitVersion"],
                         load_at_start=os.getloadavg()[0], command=command,
                         children_per_object=len(plan_offline(sample).objects))
    bench = Bench(cluster, op, AuditLog(cluster.audit_log, OPERATOR_USER))
    try:
        if direct_count:
            progress(f"baseline: {direct_count} objects written by a plain client, no operator")
            result.directs.append(bench.direct(direct_count, "before"))
        op.start()
        wait_until("the operator ready", op.ready, timeout=60)
        progress("first object after the operator's start")
        result.first_object_s = bench.burst(1, "omni-bench-first").max_s
        for count in counts:
            for round_ in range(1, (rounds if count == direct_count else 1) + 1):
                progress(f"burst of {count}" + (f", round {round_} of {rounds}" if count == direct_count else ""))
                result.bursts.append(bench.burst(count, round_=round_))
                if count == direct_count:
                    # the baseline again right after the burst it is compared with (the machine's pace
                    # drifts, and later bursts leave pods for the scheduler to retry); the operator is
                    # stopped meanwhile, as it would reconcile the baseline's objects
                    op.stop()
                    progress(f"baseline again, the operator stopped: {direct_count} objects written by a plain client")
                    result.directs.append(bench.direct(direct_count, f"after-{round_}"))
                    op.start()
                    wait_until("the operator ready", op.ready, timeout=60)
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

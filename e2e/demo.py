"""The whole stack on a local control plane, in one command (`make demo`).

1. Start the local control plane (etcd, kube-apiserver, controller-manager, scheduler, and kwok
   playing the kubelet of fake GPU node pools), or reuse the one already running from the state dir.
2. `helm upgrade --install qwen3-omni charts/qwen3-omni`: the CRD, RBAC, the operator Deployment.
   kwok only schedules the operator's pod (no container runs here), so
3. the real operator runs as a local process, `omni-operator run --all-namespaces`, against the
   cluster; its log goes to <state-dir>/logs/operator.log.
4. `kubectl apply -f examples/omni.yaml`, then watch the OmniDeployment converge: sizing, the
   weight loader, thinker and talker StatefulSets, gateway Deployment, and their pods on the node
   pools, until Ready=True. The node agent runs each serving pod's process for real (the tiny
   random-weight model, on CPU, with the environment the operator rendered), so Ready means served.
5. Ask the gateway pod one question (text + a tone in, speech out): `answer.wav`, and the command
   to ask again.
6. With --load: a burst of requests, the replicas and queue depths the autoscaler acts on printed
   as they change, then the scale-down (its window shortened to 20 s for the demo).

    python -m e2e.demo                 run, print a summary, tear everything down (exit 0 on success)
    python -m e2e.demo --load          ... and watch the autoscaler under a burst of requests
    python -m e2e.demo --keep          leave the cluster, the operator and the pods running to play with
    python -m e2e.demo --down          stop what a --keep run left running
    python -m e2e.demo --no-serve      the control plane only: no runtime processes (no torch needed)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from e2e import demo_serving
from e2e.cluster import DEFAULT_STATE_DIR, REPO_ROOT, LocalCluster
from e2e.kubelet import pod_ready
from e2e.node_agent import serve_pods
from e2e.nodes import POOL_LABEL
from e2e.operator_process import OperatorProcess
from omni_runtime.config import Env

CHART = REPO_ROOT / "charts" / "qwen3-omni"
EXAMPLE = REPO_ROOT / "examples" / "omni.yaml"
RELEASE = "qwen3-omni"
RELEASE_NAMESPACE = "qwen3-omni"
OPERATOR_PID_FILE = "demo-operator.pid"  # in the state dir; survives the cluster's own run/ dir
POLL_SECONDS = 2.0
# The demo's autoscaling, so the scale-down shows within a minute (production waits 300 s).
LOAD_AUTOSCALING = {"pollSeconds": 1, "scaleUpStabilizationSeconds": 2, "scaleDownStabilizationSeconds": 20}


def say(msg: str = "") -> None:
    print(msg, flush=True)


def step(msg: str) -> None:
    say(f"\n==> {msg}")


class DemoError(RuntimeError):
    """The demo did not converge; the message says where it stopped."""


# ------------------------------------------------------------------------------ operator process


def _operator_pid_alive(pid: int) -> bool:
    """True when pid is a live `omni_operator ... run` process (pids get reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and any(b"omni_operator" in a or b"omni-operator" in a for a in argv) \
        and b"run" in argv


def stop_kept_operator(state_dir: Path, timeout: float = 20.0) -> bool:
    """Stop the operator a previous `--keep` run left behind (if any). True when one was stopped."""
    pid_file = state_dir / OPERATOR_PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    stopped = False
    if _operator_pid_alive(pid):
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)  # its own session: the whole group
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _operator_pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _operator_pid_alive(pid):
                break
        stopped = True
    pid_file.unlink(missing_ok=True)
    return stopped


# ------------------------------------------------------------------------------ cluster views


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def _ready(obj: dict[str, Any] | None) -> bool:
    if not obj:
        return False
    ready = _conditions(obj).get("Ready", {})
    generation = obj["metadata"].get("generation")
    return (ready.get("status") == "True"
            and obj.get("status", {}).get("observedGeneration") == generation
            and ready.get("observedGeneration", generation) == generation)


def _get_json(cluster: LocalCluster, *args: str) -> Any:
    result = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _pod_table(pods: list[dict[str, Any]], pools: dict[str, str]) -> str:
    rows = [("POD", "ROLE", "READY", "PHASE", "NODE", "POOL", "GPUS")]
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        node = p["spec"].get("nodeName") or "-"
        gpus = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
                   for c in p["spec"]["containers"])
        rows.append((p["metadata"]["name"], p["metadata"]["labels"].get("app.kubernetes.io/component", "-"),
                     _conditions(p).get("Ready", {}).get("status", "-"), p["status"].get("phase", "-"),
                     node, pools.get(node, "-"), str(gpus)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _snapshot(cluster: LocalCluster, name: str, namespace: str, pools: dict[str, str]
              ) -> tuple[dict[str, Any] | None, Any, str]:
    """(the OmniDeployment, what change detection compares, the tables to print)."""
    selector = f"app.kubernetes.io/instance={name}"
    omni = _get_json(cluster, "omnideployment", name, "-n", namespace)
    workloads = (_get_json(cluster, "statefulsets,deployments", "-n", namespace, "-l", selector) or {}).get("items", [])
    pods = (_get_json(cluster, "pods", "-n", namespace, "-l", selector) or {}).get("items", [])
    key = (
        json.dumps((omni or {}).get("status"), sort_keys=True, default=str),
        sorted((w["kind"], w["metadata"]["name"], w["spec"].get("replicas"), w["status"].get("readyReplicas"))
               for w in workloads),
        sorted((p["metadata"]["name"], p["spec"].get("nodeName"), p["status"].get("phase"),
                _conditions(p).get("Ready", {}).get("status")) for p in pods),
    )
    text = [cluster.kubectl("get", "omnideployment", name, "-n", namespace, "-o", "wide", check=False).stdout.rstrip()]
    if workloads:
        text.append(cluster.kubectl("get", "statefulsets,deployments", "-n", namespace, "-l", selector,
                                    check=False).stdout.rstrip())
    if pods:
        text.append(_pod_table(pods, pools))
    return omni, key, "\n\n".join(t for t in text if t)


def _pools(cluster: LocalCluster) -> dict[str, str]:
    nodes = _get_json(cluster, "nodes") or {"items": []}
    return {n["metadata"]["name"]: n["metadata"]["labels"].get(POOL_LABEL, "-") for n in nodes["items"]}


def _instance_pods(cluster: LocalCluster, name: str, namespace: str) -> list[dict[str, Any]]:
    found = _get_json(cluster, "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}")
    return (found or {}).get("items", [])


def gateway_endpoint(cluster: LocalCluster, name: str, namespace: str) -> tuple[str, str]:
    """(URL of a ready gateway pod, the model name it serves), from the pod the operator rendered."""
    for pod in _instance_pods(cluster, name, namespace):
        if pod["metadata"]["labels"].get(demo_serving.COMPONENT) != "gateway" or not pod_ready(pod):
            continue
        ctr = pod["spec"]["containers"][0]
        port = next(p["containerPort"] for p in ctr["ports"] if p["name"] == "http")
        model = next((e.get("value") for e in ctr.get("env", []) if e["name"] == Env.SERVED_MODEL_NAME), "")
        return f"http://{pod['status']['podIP']}:{port}", model
    raise DemoError(f"no ready gateway pod of {namespace}/{name}")


def crash_looping(pods: list[dict[str, Any]], restarts: int = 2) -> str | None:
    """The name of a pod whose process has exited `restarts` times, if any."""
    for pod in pods:
        for st in pod.get("status", {}).get("containerStatuses") or []:
            if st.get("restartCount", 0) >= restarts:
                return pod["metadata"]["name"]
    return None


def failing_pods(cluster: LocalCluster, name: str, namespace: str, lines: int = 30) -> str:
    """Each pod whose process exited or is not ready, with the tail of its log."""
    out = []
    for pod in _instance_pods(cluster, name, namespace):
        statuses = pod.get("status", {}).get("containerStatuses") or []
        st = statuses[0] if statuses else {}
        if st.get("ready") or pod["status"].get("phase") == "Succeeded":
            continue
        state = st.get("state", {})
        why = (state.get("waiting") or {}).get("reason") or ("running, not ready" if "running" in state else
                                                             pod["status"].get("phase", "?"))
        last = (st.get("lastState") or {}).get("terminated")
        if last:
            why += f", last exit {last.get('exitCode')}"
        log_file = cluster.node_dir / "pods" / pod["metadata"]["uid"] / f"{st.get('name', '')}.log"
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:]) if log_file.is_file() else ""
        out.append(f"--- pod {pod['metadata']['name']} ({why}); its process's log {log_file}:\n{tail or '(empty)'}")
    return "\n".join(out)


def watch(cluster: LocalCluster, name: str, namespace: str, timeout: float) -> dict[str, Any]:
    """Print the OmniDeployment, its workloads and pods whenever they change, until Ready=True."""
    start = time.monotonic()
    last_key: Any = None
    pools = _pools(cluster)
    while True:
        elapsed = time.monotonic() - start
        omni, key, text = _snapshot(cluster, name, namespace, pools)
        if key != last_key:
            say(f"\n[{elapsed:5.0f}s] ------------------------------------------------------------")
            say(text)
            last_key = key
        if _ready(omni):
            return omni
        crashing = crash_looping(_instance_pods(cluster, name, namespace))
        if crashing:
            raise DemoError(f"the process of pod {crashing} keeps exiting (see its log below)")
        sizing = _conditions(omni or {}).get("SizingValid", {})
        if sizing.get("status") == "False" and sizing.get("observedGeneration") == omni["metadata"].get("generation"):
            # Nothing is rolled out until the spec changes: no point in waiting.
            raise DemoError(f"{namespace}/{name} cannot be sized: {sizing.get('message')}")
        if elapsed > timeout:
            conds = _conditions(omni or {})
            detail = "; ".join(f"{t}={c.get('status')} ({c.get('reason')}: {c.get('message')})"
                               for t, c in conds.items()) or "no status written"
            raise DemoError(f"{namespace}/{name} not Ready after {timeout:.0f}s: {detail}")
        time.sleep(POLL_SECONDS)


def summary(cluster: LocalCluster, omni: dict[str, Any], took: float) -> str:
    name, namespace = omni["metadata"]["name"], omni["metadata"]["namespace"]
    status = omni.get("status", {})
    pools = _pools(cluster)
    out = [f"OmniDeployment {namespace}/{name} ({omni['spec'].get('variant', '?')}) is Ready after {took:.0f}s.", ""]
    out.append("Conditions:")
    for ctype, c in _conditions(omni).items():
        out.append(f"  {ctype:12} {c.get('status'):6} {c.get('reason', '')}: {c.get('message', '')}".rstrip(": "))
    sizing = status.get("sizing") or {}
    roles = [r for r in ("thinker", "talker") if isinstance(sizing.get(r), dict)]
    if roles:
        out += ["", "Sizing (per replica):"]
        for role in roles:
            s = sizing[role]
            tp = f", tensor parallel {s['tensorParallelSize']}" if s.get("tensorParallelSize") else ""
            out.append(f"  {role:8} {s.get('estimatedGB', '?')} GB -> {s.get('gpusPerReplica', '?')} GPU(s) "
                       f"in {s.get('podsPerReplica', 1)} pod(s){tp}")
            if s.get("vllmArgs"):
                out.append(f"           vllm serve ... {' '.join(s['vllmArgs'])}")
    weights = status.get("weights") or {}
    if weights.get("source") == "Cache":
        out += ["", f"Weights: {weights.get('phase')}, commit {(weights.get('commit') or '?')[:12]} of "
                    f"{weights.get('repo')}@{weights.get('revision')}, {(weights.get('bytesTotal') or 0) / 1e6:.1f} MB "
                    f"on PVC {weights.get('claimName')} (fetched once by the loader Job, mounted read-only)"]
    elif weights:
        out += ["", f"Weights: on your PVC {weights.get('claimName')}"]
    replicas = [f"{role} {status[role]['ready']}" for role in ("thinker", "talker", "gateway")
                if isinstance(status.get(role), dict) and status[role].get("ready")]
    if replicas:
        out += ["", "Ready replicas: " + ", ".join(replicas)]
    pods = _get_json(cluster, "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}") or {"items": []}
    out += ["", "Pods:", _pod_table(pods["items"], pools)]
    if status.get("gpus") is not None:
        out += ["", f"GPUs held by the desired replicas: {status['gpus']}"]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ the demo


def run(args: argparse.Namespace) -> int:
    example = Path(args.example).resolve()
    # the OmniDeployment, among whatever else the file holds (a PVC with your weights, a Secret)
    manifest = next(d for d in yaml.safe_load_all(example.read_text()) if d and d.get("kind") == "OmniDeployment")
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"].get("namespace", "default")
    cluster = LocalCluster(args.state_dir, serving=args.serve)
    state_dir = cluster.state_dir
    operator_log = cluster.log_dir / "operator.log"
    started_cluster = False
    operator: OperatorProcess | None = None
    ok = False
    t0 = time.monotonic()
    try:
        step(f"Local control plane (state in {state_dir})")
        if stop_kept_operator(state_dir):
            say("stopped the operator a previous --keep run left running")
        started_cluster = not cluster.is_running()
        cluster.start(timeout=240)
        say(cluster.kubectl("get", "nodes", "-L", POOL_LABEL, "-L", "nvidia.com/gpu.product").stdout.rstrip())

        step(f"helm upgrade --install {RELEASE} {CHART.relative_to(REPO_ROOT)} -n {RELEASE_NAMESPACE}")
        cluster.helm("upgrade", "--install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--create-namespace",
                     "--take-ownership", "--wait", "--timeout", "3m")
        say(cluster.helm("list", "-n", RELEASE_NAMESPACE).stdout.rstrip())
        say(cluster.kubectl("get", "crd", "omnideployments.omni.qwen.ai").stdout.rstrip())
        say(cluster.kubectl("get", "deployment,serviceaccount,service", "-n", RELEASE_NAMESPACE,
                            "-l", "app.kubernetes.io/component=operator").stdout.rstrip())
        say("(kwok schedules the chart's operator pod but runs no container; the operator runs locally:)")

        step("omni-operator run --all-namespaces (local process)")
        operator_log.parent.mkdir(parents=True, exist_ok=True)
        operator_log.write_text("")
        operator = OperatorProcess(cluster, operator_log, "--all-namespaces").start()
        (state_dir / OPERATOR_PID_FILE).write_text(str(operator.proc.pid))
        say(f"pid {operator.proc.pid}, healthy at http://127.0.0.1:{operator.health_port}/healthz, "
            f"metrics at http://127.0.0.1:{operator.metrics_port}/metrics, log {operator_log}")

        if args.serve:
            step("The model the pods serve: tiny, random weights, built on this machine")
            model = demo_serving.tiny_model()
            cluster.serve_pods(model)
            say(f"{model}\nThe stand-in hub serves it for any repo; the node agent runs every serving pod's "
                "process (thinker on the transformers engine, talker, gateway) on the pod's address, "
                "with the environment the operator rendered.")

        step(f"kubectl apply -f {example.relative_to(REPO_ROOT) if example.is_relative_to(REPO_ROOT) else example}")
        say(cluster.kubectl("apply", "-f", str(example)).stdout.rstrip())

        step(f"Waiting for {namespace}/{name} to become Ready (timeout {args.timeout:.0f}s)")
        t_apply = time.monotonic()
        omni = watch(cluster, name, namespace, args.timeout)
        if operator.proc.poll() is not None:
            raise DemoError(f"the operator exited with code {operator.proc.returncode}")

        step("Summary")
        say(summary(cluster, omni, time.monotonic() - t_apply))
        if args.serve:
            answer_and_load(cluster, name, namespace, args)
        ok = True
        return 0
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:  # ClusterError, DemoError, CommandError
        say(f"\nDEMO FAILED: {err}")
        if operator_log.exists():
            say(f"\n--- last lines of {operator_log} ---")
            say("\n".join(operator_log.read_text(errors="replace").splitlines()[-60:]))
        if cluster.is_running():
            events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)
            say(f"\n--- events in {namespace} ---\n" + "\n".join(events.stdout.splitlines()[-20:]))
            if args.serve:
                say(failing_pods(cluster, name, namespace))
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        if args.keep and cluster.is_running():
            step("Left running (--keep)")
            say(f"cluster:  {cluster.server}   (state {state_dir})")
            if operator is not None and operator.proc.poll() is None:
                say(f"operator: pid {operator.proc.pid}, log {operator_log}")
            where = "" if state_dir == DEFAULT_STATE_DIR.resolve() else f" --state-dir {state_dir}"
            say(f"use it:   eval $(python -m e2e.cluster env{where})")
            say(f"          kubectl get omni -A -o wide; kubectl get pods -n {namespace} -o wide")
            say(f"stop it:  python -m e2e.demo --down{where}")
        else:
            serve_pods(cluster.node_dir, None)
            if operator is not None:
                operator.stop()
            (state_dir / OPERATOR_PID_FILE).unlink(missing_ok=True)
            if started_cluster:
                cluster.stop()
            else:
                say(f"\n(the control plane was already running before the demo; it stays up: {state_dir})")
        say(f"\n{'done' if ok else 'failed'} in {time.monotonic() - t0:.0f}s")


def answer_and_load(cluster: LocalCluster, name: str, namespace: str, args: argparse.Namespace) -> None:
    url, model = gateway_endpoint(cluster, name, namespace)
    answer_file = Path(args.answer).resolve()
    step(f"Ask the gateway pod at {url}: text + a 1 s tone in, speech out")
    answer = demo_serving.ask(url, model, answer_file)
    say(f"transcript: {answer.transcript!r}")
    say(f"speech:     {answer_file} ({answer.seconds:.1f} s, {len(answer.wav)} bytes)")
    say("(random weights: the words and the sound are noise; every step on the way is the real one)")
    say(f"\nAsk again{' while it runs' if args.keep else ' (with --keep, while the demo runs)'}:\n"
        + demo_serving.ask_again_command(url, model))
    say(f"Or talk to it over the OpenAI Realtime API (WebSocket {url.replace('http', 'ws', 1)}/v1/realtime):\n"
        f"  espeak-ng -w question.wav 'What is the weather like today?'\n"
        f"  .venv/bin/python examples/realtime_client.py question.wav --url {url} --model {model}")
    if not args.load:
        return
    step(f"Load: {args.load_clients} clients for {args.load_seconds:.0f}s "
         f"(autoscaling shortened for the demo: {json.dumps(LOAD_AUTOSCALING)})")
    cluster.kubectl("patch", "omnideployment", name, "-n", namespace, "--type", "merge",
                    "-p", json.dumps({"spec": {"autoscaling": LOAD_AUTOSCALING}}))

    def read() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return (_get_json(cluster, "omnideployment", name, "-n", namespace) or {},
                _instance_pods(cluster, name, namespace))

    report = demo_serving.run_load(read, url, model, say, concurrency=args.load_clients,
                                   load_seconds=args.load_seconds, settle_seconds=120)
    say(f"\nload: {report.answered} answered, {report.failed} failed; "
        + ", ".join(f"{r} replicas peaked at {report.peak[r]}, ended at {report.final[r]}" for r in report.peak))
    if report.peak.get("thinker", 0) <= 1 or report.final.get("thinker", 0) >= report.peak.get("thinker", 0):
        raise DemoError("the thinker did not scale up under the load and back down after it")


def down(args: argparse.Namespace) -> int:
    cluster = LocalCluster(args.state_dir)
    serve_pods(cluster.node_dir, None)
    if stop_kept_operator(cluster.state_dir):
        say("stopped the demo's operator")
    cluster.stop()
    say(f"stopped the control plane of {cluster.state_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=None,
                        help=f"control-plane state (certificates, logs, etcd data); default {DEFAULT_STATE_DIR}")
    parser.add_argument("--keep", action="store_true",
                        help="leave the cluster and the operator running afterwards")
    parser.add_argument("--down", action="store_true", help="stop what a --keep run left running, and exit")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the OmniDeployment to become Ready (default 300)")
    parser.add_argument("--example", default=str(EXAMPLE), help="the OmniDeployment to apply")
    parser.add_argument("--no-serve", dest="serve", action="store_false",
                        help="run no runtime processes for the pods (no answer; torch not needed)")
    parser.add_argument("--answer", default="answer.wav", help="where to write the spoken answer (default answer.wav)")
    parser.add_argument("--load", action="store_true", help="then send a burst of requests and watch the autoscaler")
    parser.add_argument("--load-clients", type=int, default=12, help="concurrent clients of the burst (default 12)")
    parser.add_argument("--load-seconds", type=float, default=60.0, help="how long the burst lasts (default 60)")
    args = parser.parse_args(argv)
    if args.down:
        return down(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

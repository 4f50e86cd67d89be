"""A real Kubernetes control plane on loopback, with fake GPU node pools.

etcd, kube-apiserver (RBAC, service-account tokens), kube-controller-manager,
kube-scheduler, kwok and the node agent run as local processes. kwok plays the kubelet of
the fake nodes in ``e2e.nodes.NODE_POOLS`` and hands pods loopback IPs from ``e2e.nodes.POD_CIDR``, so
a test can run a real process on a pod's IP. The node agent (e2e/node_agent.py) does what
kwok does not: it provisions hostPath volumes for claims, runs the operator's weight-loader
pods for real, and serves a stand-in Hugging Face hub (``LocalCluster.hub_url``). Started with
``serving=True`` it also runs the operator's serving pods (``serve_pods``), Ready only from their
readiness probes (e2e/kwok_stages.py, e2e/serving_kubelet.py).

    from e2e.cluster import LocalCluster
    c = LocalCluster()          # state in <repo>/.e2e-state
    c.start()                   # reuses a cluster already running from that state dir
    c.kubectl("get", "nodes")
    c.stop()

Command line: ``python -m e2e.cluster up|down|status|env [--state-dir DIR]``.
The state dir defaults to ``$OMNI_E2E_STATE`` or <repo>/.e2e-state; the binaries
come from e2e/build-binaries.sh (``$OMNI_BIN_DIR`` points elsewhere).

Only the standard library and the ``openssl`` command are needed (the node agent's loader
pods need the repository's runtime package in the running interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from e2e import node_agent
from e2e.binaries import KWOK_STAGES, default_bin_dir, ensure_binaries, missing_binaries
from e2e.components import (AUDIT_POLICY, CLUSTER_NAME, SERVICE_CIDR, Ports, apiserver_args, component_healthy,
                            controller_manager_args, etcd_args, etcd_healthy, kwok_args, scheduler_args)
from e2e.kubeapi import TRANSPORT_ERRORS, KubeApi
from e2e.kwok_stages import derive_stages
from e2e.nodes import NODE_POOLS, node_manifests
from e2e.pki import Pki
from e2e.procs import (ClusterError, CommandError, die_with_parent, free_ports, pid_alive, pid_argv, signal_process,
                       tail_file, wait_until)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO_ROOT / ".e2e-state"

NODE_AGENT = "node-agent"


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok + node agent on loopback."""

    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", NODE_AGENT)

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        bin_dir: Path | str | None = None,
        die_with_parent: bool = False,
        audit: bool = False,
        serving: bool = False,
    ):
        """``die_with_parent``: the components are killed when this process dies
        (used by the test fixture so that even a killed test run leaves nothing behind).
        ``audit``: the apiserver writes an audit log (``AUDIT_POLICY``) to ``audit_log``.
        ``serving``: the node agent runs the operator's serving pods (``serve_pods``) as a kubelet
        would, Ready only from their readiness probe; without it kwok makes every pod Ready at once
        and nothing runs (the control plane alone, what most tests need). See e2e/kwok_stages.py."""
        self.die_with_parent = die_with_parent
        self.audit = audit
        self.serving = serving
        self.state_dir = Path(state_dir or os.environ.get("OMNI_E2E_STATE") or DEFAULT_STATE_DIR).resolve()
        self.bin_dir = Path(bin_dir).resolve() if bin_dir else default_bin_dir()
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.log_dir = self.state_dir / "logs"
        self.pki = Pki(self.state_dir / "pki", cluster_name=CLUSTER_NAME,
                       service_ip=str(next(ipaddress.ip_network(SERVICE_CIDR).hosts())))
        self.node_dir = self.state_dir / "node"  # the node agent's volumes, pod logs, hub checkpoint
        self._run_dir = self.state_dir / "run"
        self._info_file = self._run_dir / "cluster.json"
        self._procs: dict[str, subprocess.Popen] = {}
        self._args: dict[str, list[str]] = {}  # flags each component was started with
        self._info: dict[str, Any] = {}
        self._apis: dict[str, KubeApi] = {}  # by server URL

    # -- public properties --------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        return env

    @property
    def server(self) -> str:
        """The apiserver URL (https://127.0.0.1:<port>) of the running cluster."""
        info = self._info or self._read_info()
        if not info:
            raise ClusterError(f"no cluster is running from {self.state_dir}")
        return info["server"]

    @property
    def ca_file(self) -> Path:
        return self.pki.path("ca.crt")

    @property
    def hub_url(self) -> str:
        """The node agent's stand-in Hugging Face hub: loader pods that set no ``HF_ENDPOINT``
        download from it; any repo it was not given serves a small placeholder checkpoint."""
        info = self._info or self._read_info()
        if not info.get("hub_url"):
            raise ClusterError(f"no cluster is running from {self.state_dir}")
        return info["hub_url"]

    def pvc_host_dir(self, namespace: str, claim: str) -> Path:
        """The directory on this machine behind a bound PersistentVolumeClaim (a node agent's PV)."""
        status, pvc = self.api("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        volume = pvc.get("spec", {}).get("volumeName") if status == 200 else None
        if not volume:
            raise ClusterError(f"PVC {namespace}/{claim} is not bound (HTTP {status})")
        status, pv = self.api("GET", f"/api/v1/persistentvolumes/{volume}")
        if status != 200 or "hostPath" not in pv.get("spec", {}):
            raise ClusterError(f"PV {volume} of PVC {namespace}/{claim} is not a hostPath volume")
        return Path(pv["spec"]["hostPath"]["path"])

    def serve_pods(self, model: Path | None, *, images: Iterable[str] | None = None) -> None:
        """Run the serving pods' processes with ``model`` as the stand-in hub's default repo, or
        stop them (None); ``images``: what the node can pull (e2e/node_agent.serve_pods)."""
        if model is not None and not (self.serving or self._read_info().get("serving")):
            raise ClusterError(f"the cluster of {self.state_dir} was started without serving=True: "
                               "kwok makes its pods Ready itself, so no process may be run for them")
        node_agent.serve_pods(self.node_dir, model, images=images)

    def container_pid(self, namespace: str, pod: str) -> int:
        """The pid of the process the node agent runs for a pod's (first) container."""
        status, body = self.api("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
        if status != 200:
            raise ClusterError(f"pod {namespace}/{pod}: HTTP {status}")
        container = body["spec"]["containers"][0]["name"]
        return int((self.node_dir / "pods" / body["metadata"]["uid"] / f"{container}.pid").read_text())

    def log_file(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    @property
    def audit_log(self) -> Path:
        """JSON lines, one audit event per request (only with ``audit=True``)."""
        return self.log_dir / "audit.log"

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalCluster(state_dir={str(self.state_dir)!r})"

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 120.0, *, build: bool = True) -> "LocalCluster":
        """Start the control plane and the node pools; reuse a healthy running one."""
        t0 = time.monotonic()
        with self._lock():
            return self._start_locked(t0, timeout, build)

    def _start_locked(self, t0: float, timeout: float, build: bool) -> "LocalCluster":
        if self.is_running():
            self._info = self._read_info()
            if self.audit and not self._info.get("audit"):
                raise ClusterError(f"the cluster running from {self.state_dir} has no audit log; "
                                   "stop it first to start one with audit=True")
            if self.serving != bool(self._info.get("serving")):
                running = "runs serving pods" if self._info.get("serving") else "runs the control plane alone"
                raise ClusterError(f"the cluster running from {self.state_dir} {running}; stop it first "
                                   f"(python -m e2e.demo --down) to start one with serving={self.serving}")
            _log(f"reusing the cluster running from {self.state_dir} at {self.server}")
            self._ensure_nodes(timeout)
            return self
        self._stop_locked()  # leftovers of a half-dead cluster from this state dir
        if build:
            ensure_binaries(self.bin_dir)
        self._check_binaries()
        for attempt in range(3):
            try:
                self._start_once(t0 + timeout)
                break
            except BaseException as e:
                self._stop_locked()
                if isinstance(e, ClusterError) and attempt < 2 and "address already in use" in str(e):
                    _log("a port was taken meanwhile; retrying with fresh ports")
                    continue
                raise
        _log(f"cluster ready at {self.server} in {time.monotonic() - t0:.1f}s (KUBECONFIG={self.kubeconfig})")
        return self

    def stop(self, *, purge: bool = False) -> None:
        """Terminate every component started from this state dir; nothing keeps running.

        The etcd data goes with it (the next start() begins with an empty cluster);
        certificates and logs stay unless ``purge`` is set.
        """
        with self._lock():
            self._stop_locked()
        if purge:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    @contextlib.contextmanager
    def _lock(self):
        """One start/stop at a time per state dir (across processes)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _stop_locked(self) -> None:
        pids = self._known_pids()
        # Clients first, then the apiserver, then etcd: each exits within about a
        # second that way (an apiserver that has lost etcd lingers much longer).
        stages = ((NODE_AGENT, "kwok", "kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",))
        for stage in stages:
            running = {n: pids[n] for n in stage if n in pids}
            for pid in running.values():
                signal_process(pid, signal.SIGTERM)
            for sig_deadline, sig in ((5.0, signal.SIGKILL), (5.0, None)):
                deadline = time.monotonic() + sig_deadline
                while any(self._alive(n, p) for n, p in running.items()) and time.monotonic() < deadline:
                    time.sleep(0.02)
                still = {n: p for n, p in running.items() if self._alive(n, p)}
                if not still or sig is None:
                    break
                _log(f"{', '.join(still)} ignored SIGTERM; killing")
                for pid in still.values():
                    signal_process(pid, sig)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        self._info = {}
        shutil.rmtree(self._run_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir / "etcd", ignore_errors=True)

    def is_running(self) -> bool:
        """True when every component from this state dir is alive and the apiserver is ready."""
        info = self._read_info()
        if not info:
            return False
        for name in self.COMPONENTS:
            pid = info.get("pids", {}).get(name)
            if not pid or not self._owned_pid_alive(name, pid):
                return False
        try:
            return self._get("/readyz", server=info["server"])[0] == 200
        except (*TRANSPORT_ERRORS, ClusterError, KeyError):
            return False

    def status(self) -> dict[str, Any]:
        info = self._read_info()
        pids = info.get("pids", {})
        comps = {
            n: {"pid": pids.get(n), "alive": bool(pids.get(n)) and self._owned_pid_alive(n, pids[n])}
            for n in self.COMPONENTS
        }
        return {
            "state_dir": str(self.state_dir),
            "server": info.get("server"),
            "running": self.is_running(),
            "components": comps,
            "kubeconfig": str(self.kubeconfig),
            "hub_url": info.get("hub_url"),
            "bin_dir": str(self.bin_dir),
        }

    # -- clients --------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        return self._run_tool("kubectl", args, input=input, check=check, timeout=timeout)

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        return self._run_tool("helm", args, input=input, check=check, timeout=timeout)

    def apply(self, *objects: Mapping[str, Any], namespace: str | None = None,
              timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Server-side apply of the given objects (as one JSON List)."""
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        args = ["apply", "--server-side", "--force-conflicts", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        return self.kubectl(*args, input=doc, timeout=timeout)

    def get_json(self, *args: str) -> Any:
        """``kubectl get <args> -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def api(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, anonymous: bool = False
    ) -> tuple[int, Any]:
        """A raw API request: admin client certificate by default, a bearer token,
        or nothing at all (``anonymous``). Returns (HTTP status, parsed JSON or text)."""
        return self._request(method, path, body, token=token, anonymous=anonymous)

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path, duration: str = "24h") -> Path:
        """A kubeconfig at `path` that authenticates as ServiceAccount namespace/name with a bound token,
        as a pod of that account would (the account must exist)."""
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout.strip()
        config = json.loads(self.kubeconfig.read_text())
        config["users"] = [{"name": name, "user": {"token": token}}]
        for ctx in config["contexts"]:
            ctx["context"]["user"] = name
        path.write_text(json.dumps(config, indent=2))
        os.chmod(path, 0o600)
        return path

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
        """Poll ``check`` until it returns something truthy; raise ClusterError on timeout."""
        return wait_until(what, check, timeout, interval, error=ClusterError)

    # -- internals: processes --------------------------------------------------

    def _check_binaries(self) -> None:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise ClusterError(
                f"missing in {self.bin_dir}: {', '.join(missing)} (run `bash e2e/build-binaries.sh`)"
            )

    def _read_info(self) -> dict[str, Any]:
        try:
            return json.loads(self._info_file.read_text())
        except (OSError, ValueError):
            return {}

    def _known_pids(self) -> dict[str, int]:
        pids = {n: p.pid for n, p in self._procs.items()}
        for name, pid in self._read_info().get("pids", {}).items():
            pids.setdefault(name, pid)
        for pidfile in self._run_dir.glob("*.pid") if self._run_dir.exists() else ():
            try:
                pids.setdefault(pidfile.stem, int(pidfile.read_text().strip()))
            except ValueError:
                pass
        # only processes that really run our binaries (pids get reused)
        return {n: p for n, p in pids.items() if n in self._procs or self._owned_pid_alive(n, p)}

    def _owned_pid_alive(self, name: str, pid: int) -> bool:
        """pid is alive and runs this component (pids get reused)."""
        argv = pid_argv(pid)
        if not argv or not pid_alive(pid):
            return False
        if name == NODE_AGENT:
            return "e2e.node_agent" in argv
        return os.path.basename(argv[0]) == name

    def _alive(self, name: str, pid: int) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return self._owned_pid_alive(name, pid)

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        log_path = self.log_file(name)
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "ETCDCTL_API")}
        if name == NODE_AGENT:
            cmd = [sys.executable, "-m", "e2e.node_agent", *args]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
            env["PYTHONUNBUFFERED"] = "1"
        else:
            cmd = [str(self.bin_dir / name), *args]
        with open(log_path, "wb") as log:
            log.write(f"$ {name} {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        self._procs[name] = proc
        self._args[name] = list(args)
        (self._run_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def restart_apiserver(self, down_seconds: float = 0.0, timeout: float = 60.0) -> None:
        """Kill the apiserver (SIGKILL, like a crash) and start it again with the same flags and
        port, keeping etcd's data: clients see their connections and watches break and must recover.
        Only the process that started the cluster can do this (it holds the flags)."""
        proc = self._procs.get("kube-apiserver")
        if proc is None or "kube-apiserver" not in self._args:
            raise ClusterError("restart_apiserver needs the LocalCluster object that started the cluster")
        signal_process(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(down_seconds)
        self._spawn("kube-apiserver", self._args["kube-apiserver"])
        self._write_info()
        self._wait("kube-apiserver /readyz after a restart", "kube-apiserver",
                   lambda: self._get("/readyz")[0] == 200, time.monotonic() + timeout)

    @contextlib.contextmanager
    def paused_apiserver(self, timeout: float = 60.0):
        """Freeze the apiserver (SIGSTOP) for the body of the ``with``: connections stay open and
        requests are accepted by the kernel, but nothing answers, like a blackholed network. It is
        resumed (SIGCONT) on the way out, even when the body fails, and waited for until ready."""
        pid = self._known_pids().get("kube-apiserver")
        if pid is None:
            raise ClusterError("no kube-apiserver is running")
        signal_process(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            signal_process(pid, signal.SIGCONT)
            self.wait_for("kube-apiserver /readyz after a pause", lambda: self._get("/readyz")[0] == 200,
                          timeout=timeout)

    def _assert_alive(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise ClusterError(
                f"{name} exited with code {proc.returncode}; last lines of {self.log_file(name)}:\n"
                + tail_file(self.log_file(name))
            )

    def _wait(self, what: str, component: str, check: Callable[[], bool], deadline: float) -> None:
        last: object = None
        while True:
            self._assert_alive(component)
            try:
                if check():
                    return
            except (*TRANSPORT_ERRORS, ValueError, ClusterError) as e:
                last = e
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out waiting for {what} (last error: {last!r}); last lines of "
                    f"{self.log_file(component)}:\n{tail_file(self.log_file(component))}"
                )
            time.sleep(0.1)

    def _start_once(self, deadline: float) -> None:
        t0 = time.monotonic()
        for d in (self.log_dir, self._run_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self.pki.complete():
            self.pki.create()
        ports = Ports(*free_ports(5))
        server = f"https://127.0.0.1:{ports.apiserver}"
        self._info = {"server": server, "ports": {"etcd": ports.etcd, "kube-apiserver": ports.apiserver,
                                                  "kube-controller-manager": ports.controller_manager,
                                                  "kube-scheduler": ports.scheduler},
                      "audit": self.audit, "serving": self.serving}
        self._write_kubeconfigs(server)

        etcd_dir = self.state_dir / "etcd"
        shutil.rmtree(etcd_dir, ignore_errors=True)
        etcd_dir.mkdir(mode=0o700)
        self._spawn("etcd", etcd_args(etcd_dir, ports))
        self._wait("etcd /health", "etcd", lambda: etcd_healthy(ports.etcd), deadline)
        t_etcd = time.monotonic()

        self._spawn("kube-apiserver", apiserver_args(self.pki, ports, self._run_dir, self._audit_policy(),
                                                     self.audit_log))
        self._wait("kube-apiserver /readyz", "kube-apiserver", lambda: self._get("/readyz")[0] == 200, deadline)
        t_api = time.monotonic()

        self._spawn("kube-controller-manager", controller_manager_args(
            self._component_kubeconfig("kube-controller-manager"), self.pki, ports, self._run_dir))
        self._spawn("kube-scheduler", scheduler_args(self._component_kubeconfig("kube-scheduler"), ports,
                                                     self._run_dir))
        self._spawn("kwok", kwok_args(self._component_kubeconfig("kwok"), self._write_kwok_stages()))
        shutil.rmtree(self.node_dir, ignore_errors=True)  # volumes and pods of an earlier cluster
        self._spawn(NODE_AGENT, [f"--kubeconfig={self._component_kubeconfig(NODE_AGENT)}",
                                 f"--state-dir={self.node_dir}", *(["--serving-pods"] if self.serving else [])])
        self._wait("the node agent", NODE_AGENT, lambda: bool(node_agent.read_info(self.node_dir)), deadline)
        self._info["hub_url"] = node_agent.read_info(self.node_dir)["hub_url"]
        self._write_info()
        self._create_nodes()
        self._wait("kube-controller-manager /healthz", "kube-controller-manager",
                   lambda: component_healthy(ports.controller_manager), deadline)
        self._wait("kube-scheduler /healthz", "kube-scheduler",
                   lambda: component_healthy(ports.scheduler), deadline)
        # the serviceaccount controller has run: pods can be created in "default"
        self._wait("the default service account", "kube-controller-manager",
                   lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200, deadline)
        self._wait("all nodes Ready", "kwok", self._nodes_ready, deadline)
        _log(f"etcd {t_etcd - t0:.1f}s, apiserver {t_api - t_etcd:.1f}s, "
             f"controllers+nodes {time.monotonic() - t_api:.1f}s")

    def _audit_policy(self) -> Path | None:
        if not self.audit:
            return None
        policy = self._run_dir / "audit-policy.yaml"
        policy.write_text(json.dumps(AUDIT_POLICY, indent=2))  # JSON is YAML
        self.audit_log.unlink(missing_ok=True)
        return policy

    def _write_kwok_stages(self) -> Path:
        path = self._run_dir / KWOK_STAGES
        path.write_text(derive_stages((self.bin_dir / KWOK_STAGES).read_text(), serving=self.serving))
        return path

    def _write_info(self) -> None:
        self._info["pids"] = {n: p.pid for n, p in self._procs.items()}
        self._info["bin_dir"] = str(self.bin_dir)
        tmp = self._info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._info, indent=2))
        tmp.replace(self._info_file)

    def _component_kubeconfig(self, name: str) -> Path:
        return self._run_dir / f"{name}.kubeconfig"

    def _write_kubeconfigs(self, server: str) -> None:
        for name in ("kube-controller-manager", "kube-scheduler", "kwok", NODE_AGENT):
            path = self._component_kubeconfig(name)
            path.write_text(json.dumps(self.pki.kubeconfig(server, name), indent=2))
            os.chmod(path, 0o600)
        admin = self.pki.kubeconfig(server, "admin")
        tmp = self.kubeconfig.with_suffix(".tmp")
        tmp.write_text(json.dumps(admin, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.kubeconfig)

    # -- internals: HTTP ---------------------------------------------------------

    def _request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None,
        anonymous: bool = False, timeout: float = 10.0, server: str | None = None,
    ) -> tuple[int, Any]:
        server = server or self.server
        if server not in self._apis:
            self._apis[server] = KubeApi(server, self.pki.path("ca.crt"), self.pki.path("admin.crt"),
                                         self.pki.path("admin.key"))
        return self._apis[server].request(method, path, body, token=token, anonymous=anonymous, timeout=timeout)

    def _get(self, path: str, server: str | None = None) -> tuple[int, Any]:
        return self._request("GET", path, timeout=5.0, server=server)

    # -- internals: nodes -----------------------------------------------------

    def _create_nodes(self) -> None:
        for manifest in node_manifests():
            status, body = self._request("POST", "/api/v1/nodes", manifest)
            if status == 409:
                continue
            if status != 201:
                raise ClusterError(f"creating node {manifest['metadata']['name']} failed: {status} {body}")

    def _nodes_ready(self) -> bool:
        status, body = self._get("/api/v1/nodes")
        if status != 200:
            return False
        ready = {
            n["metadata"]["name"]
            for n in body.get("items", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        }
        return all(name in ready for pool in NODE_POOLS for name in pool.nodes)

    def _ensure_nodes(self, timeout: float) -> None:
        self._create_nodes()
        self.wait_for("all nodes Ready", self._nodes_ready, timeout)

    def _run_tool(self, tool: str, args: Sequence[str], *, input: str | None, check: bool, timeout: float
                  ) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / tool), *map(str, args)]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, [tool, *map(str, args)], proc.stdout, proc.stderr)
        return proc


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _env_lines(c: LocalCluster) -> str:
    path = os.pathsep.join([str(c.bin_dir), os.environ.get("PATH", "")])
    return f"export KUBECONFIG={shlex.quote(str(c.kubeconfig))}; export PATH={shlex.quote(path)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=None,
                        help=f"cluster state (certificates, logs, etcd data); default {DEFAULT_STATE_DIR}")
    parser.add_argument("--purge", action="store_true", help="down: also delete the state dir")
    parser.add_argument("--timeout", type=float, default=180.0, help="up: seconds to wait for readiness")
    parser.add_argument("--audit", action="store_true", help="up: audit log of the operator's writes in logs/")
    parser.add_argument("--serving", action="store_true",
                        help="up: the node agent runs the operator's serving pods (Ready from their probes)")
    args = parser.parse_args(argv)
    c = LocalCluster(args.state_dir, audit=args.audit, serving=args.serving)
    if args.command == "up":
        try:
            c.start(timeout=args.timeout)
        except ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(_env_lines(c))
        return 0
    if args.command == "down":
        c.stop(purge=args.purge)
        _log(f"stopped the cluster of {c.state_dir}")
        return 0
    if args.command == "env":
        print(_env_lines(c))
        return 0
    st = c.status()
    print(f"state dir:  {st['state_dir']}")
    print(f"server:     {st['server'] or '-'}")
    print(f"kubeconfig: {st['kubeconfig']}")
    print(f"hub:        {st['hub_url'] or '-'}   (the node agent's stand-in Hugging Face hub)")
    for name, comp in st["components"].items():
        print(f"  {name:24} {'running' if comp['alive'] else 'stopped':8} pid={comp['pid'] or '-'}")
    print("healthy" if st["running"] else "not running")
    return 0 if st["running"] else 1


if __name__ == "__main__":
    sys.exit(main())

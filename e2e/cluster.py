"""A real Kubernetes control plane on loopback, with fake GPU node pools.

etcd, kube-apiserver (RBAC, service-account tokens), kube-controller-manager,
kube-scheduler and kwok run as local processes; kwok plays the kubelet of the
fake nodes in ``NODE_POOLS`` and hands pods loopback IPs from ``POD_CIDR``, so a
test can run a real process on a pod's IP.

    from e2e.cluster import LocalCluster
    c = LocalCluster()          # state in <repo>/.e2e-state
    c.start()                   # reuses a cluster already running from that state dir
    c.kubectl("get", "nodes")
    c.stop()

Command line: ``python -m e2e.cluster up|down|status|env [--state-dir DIR]``.
The state dir defaults to ``$OMNI_E2E_STATE`` or <repo>/.e2e-state; the binaries
come from e2e/build-binaries.sh (``$OMNI_BIN_DIR`` points elsewhere).

Only the standard library and the ``openssl`` command are needed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import fcntl
import http.client
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "e2e" / "build-binaries.sh"
DEFAULT_STATE_DIR = REPO_ROOT / ".e2e-state"

# ---------------------------------------------------------------------------
# Node pools
# ---------------------------------------------------------------------------

POOL_LABEL = "omni.qwen.ai/pool"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB per GPU, as GPU feature discovery reports it
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_TAINT: Mapping[str, str] = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# kwok manages only nodes with this label; other nodes (if a test adds any) are left alone.
KWOK_NODE_LABEL = ("type", "kwok")
# kwok hands every pod an address from this loopback range (all of 127/8 is local on Linux).
POD_CIDR = "127.0.64.0/18"
NODE_IP = "127.0.0.1"
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
         "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
    ],
}


@dataclass(frozen=True)
class NodePool:
    """A group of identical fake nodes."""

    name: str
    nodes: tuple[str, ...]
    cpu: str
    memory: str
    gpus_per_node: int = 0
    gpu_product: str | None = None
    gpu_memory_mib: int | None = None
    pods: int = 110
    extra_labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_gpus(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def labels(self) -> dict[str, str]:
        labels = {POOL_LABEL: self.name, KWOK_NODE_LABEL[0]: KWOK_NODE_LABEL[1]}
        if self.has_gpus:
            labels.update(
                {
                    GPU_PRODUCT_LABEL: str(self.gpu_product),
                    GPU_MEMORY_LABEL: str(self.gpu_memory_mib),
                    GPU_COUNT_LABEL: str(self.gpus_per_node),
                    "nvidia.com/gpu.present": "true",
                }
            )
        labels.update(self.extra_labels)
        return labels

    @property
    def taints(self) -> list[dict[str, str]]:
        return [dict(GPU_TAINT)] if self.has_gpus else []

    @property
    def capacity(self) -> dict[str, str]:
        cap = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": "1Ti",
        }
        if self.has_gpus:
            cap[GPU_RESOURCE] = str(self.gpus_per_node)
        return cap

    @property
    def node_selector(self) -> dict[str, str]:
        """What a workload puts in ``spec.nodeSelector`` to land on this pool."""
        return {POOL_LABEL: self.name}

    @property
    def tolerations(self) -> list[dict[str, str]]:
        """What a workload needs in ``spec.tolerations`` to land on this pool."""
        return [{"key": t["key"], "operator": "Exists", "effect": t["effect"]} for t in self.taints]

    def node_manifest(self, node: str) -> dict[str, Any]:
        labels = {
            "kubernetes.io/hostname": node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node,
                "labels": labels,
                "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
            },
            "spec": {"taints": self.taints},
            "status": {"capacity": self.capacity, "allocatable": self.capacity},
        }


NODE_POOLS: tuple[NodePool, ...] = (
    NodePool(
        name="thinker",
        nodes=("thinker-gpu-0", "thinker-gpu-1"),
        cpu="96",
        memory="1Ti",
        gpus_per_node=8,
        gpu_product="NVIDIA-H100-80GB-HBM3",
        gpu_memory_mib=81559,
    ),
    NodePool(
        name="talker",
        nodes=("talker-gpu-0", "talker-gpu-1"),
        cpu="48",
        memory="192Gi",
        gpus_per_node=4,
        gpu_product="NVIDIA-L4",
        gpu_memory_mib=23034,
    ),
    NodePool(name="cpu", nodes=("cpu-0", "cpu-1"), cpu="32", memory="128Gi"),
)
POOLS: dict[str, NodePool] = {p.name: p for p in NODE_POOLS}


def node_manifests(pools: Iterable[NodePool] = NODE_POOLS) -> list[dict[str, Any]]:
    return [pool.node_manifest(n) for pool in pools for n in pool.nodes]


# ---------------------------------------------------------------------------
# Errors and small helpers
# ---------------------------------------------------------------------------


class ClusterError(RuntimeError):
    """The control plane could not be started or is not healthy."""


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; the message carries its output."""

    def __str__(self) -> str:
        cmd = " ".join(str(a) for a in self.cmd)
        out = (self.stderr or "").strip() or (self.output or "").strip()
        return f"`{cmd}` exited with {self.returncode}:\n{_tail_text(out, 40)}"


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return _tail_text(data, lines)


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux prctl).

    SIGKILL, not SIGTERM: an orphaned throwaway cluster has nothing worth saving, and
    an apiserver that loses etcd at the same moment lingers on SIGTERM."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _pid_exe(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode()
    except OSError:
        return None


def pinned_versions() -> dict[str, str]:
    """The versions pinned in e2e/build-binaries.sh, e.g. {"K8S_VERSION": "v1.36.3", ...}."""
    versions = {}
    for line in BUILD_SCRIPT.read_text().splitlines():
        m = re.match(r'^([A-Z0-9_]+_VERSION)="([^"]+)"', line)
        if m:
            versions[m.group(1)] = m.group(2)
    return versions


def default_bin_dir() -> Path:
    """The versioned binary directory (``$OMNI_BIN_DIR`` overrides it)."""
    if os.environ.get("OMNI_BIN_DIR"):
        return Path(os.environ["OMNI_BIN_DIR"])
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-dir"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def ensure_binaries(bin_dir: Path | None = None) -> Path:
    """Build the binaries (once; cached outside the repo) unless all are present.

    Only the directory that e2e/build-binaries.sh builds into is built; any other
    ``bin_dir`` (``$OMNI_BIN_DIR``) must already hold everything."""
    env = {k: v for k, v in os.environ.items() if k != "OMNI_BIN_DIR"}
    script_dir = Path(subprocess.run(["bash", str(BUILD_SCRIPT), "--print-dir"], capture_output=True,
                                     text=True, check=True, env=env).stdout.strip())
    bin_dir = Path(bin_dir or default_bin_dir())
    if bin_dir.resolve() != script_dir.resolve():
        missing = [b for b in LocalCluster.BINARIES if not os.access(bin_dir / b, os.X_OK)]
        if missing:
            raise ClusterError(f"{bin_dir} lacks {', '.join(missing)}; build them with e2e/build-binaries.sh")
        return bin_dir
    if subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], capture_output=True, env=env).returncode != 0:
        _log(f"building the control-plane binaries into {bin_dir} (first run only; takes a while)")
        try:
            subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, env=env)
        except subprocess.CalledProcessError as e:
            raise ClusterError(f"e2e/build-binaries.sh failed with exit code {e.returncode} (output above)") from e
    return bin_dir


# ---------------------------------------------------------------------------
# Certificates (openssl command line)
# ---------------------------------------------------------------------------

_OPENSSL_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
authorityKeyIdentifier = keyid
subjectAltName = @alt_names
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
[alt_names]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = {service_ip}
"""

# client certificates: file stem -> (CN, O)
_CLIENT_CERTS = {
    "admin": ("kubernetes-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", None),
    "kube-scheduler": ("system:kube-scheduler", None),
    "kwok": ("kwok-controller", "system:masters"),
}


class _Pki:
    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, name: str) -> Path:
        return self.dir / name

    def complete(self) -> bool:
        names = ["ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub"]
        names += [f"{n}.{ext}" for n in _CLIENT_CERTS for ext in ("crt", "key")]
        return all(self.path(n).exists() for n in names)

    def _openssl(self, *args: str) -> None:
        try:
            subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True, text=True)
        except FileNotFoundError as e:
            raise ClusterError("the `openssl` command is needed to create certificates") from e
        except subprocess.CalledProcessError as e:
            raise ClusterError(f"openssl {' '.join(args)} failed:\n{e.stderr}") from e

    def _ec_key(self, name: str) -> None:
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name)

    def _sign(self, stem: str, subject: str, section: str) -> None:
        self._ec_key(f"{stem}.key")
        self._openssl("req", "-new", "-config", "openssl.cnf", "-key", f"{stem}.key", "-subj", subject,
                      "-out", f"{stem}.csr")
        self._openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", "0x" + secrets.token_hex(16), "-days", "3650", "-sha256",
            "-extfile", "openssl.cnf", "-extensions", section, "-out", f"{stem}.crt",
        )
        self.path(f"{stem}.csr").unlink()

    def create(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o700)
        service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
        self.path("openssl.cnf").write_text(_OPENSSL_CONF.format(service_ip=service_ip))
        self._ec_key("ca.key")
        self._openssl(
            "req", "-new", "-x509", "-config", "openssl.cnf", "-key", "ca.key", "-subj", f"/CN={CLUSTER_NAME}-ca",
            "-days", "3650", "-sha256", "-extensions", "ca", "-out", "ca.crt",
        )
        self._sign("apiserver", "/CN=kube-apiserver", "server")
        for stem, (cn, org) in _CLIENT_CERTS.items():
            self._sign(stem, f"/CN={cn}" + (f"/O={org}" if org else ""), "client")
        # service-account token signing key (RS256)
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key")
        self._openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }


# ---------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback."""

    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
    BINARIES = COMPONENTS + ("kubectl", "helm")
    KWOK_STAGES = "kwok-stages.yaml"  # kwok's default node/pod stages, written by build-binaries.sh

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        bin_dir: Path | str | None = None,
        die_with_parent: bool = False,
        audit: bool = False,
    ):
        """``die_with_parent``: the components are killed when this process dies
        (used by the test fixture so that even a killed test run leaves nothing behind).
        ``audit``: the apiserver writes an audit log (``AUDIT_POLICY``) to ``audit_log``."""
        self.die_with_parent = die_with_parent
        self.audit = audit
        self.state_dir = Path(state_dir or os.environ.get("OMNI_E2E_STATE") or DEFAULT_STATE_DIR).resolve()
        self.bin_dir = Path(bin_dir).resolve() if bin_dir else default_bin_dir()
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.log_dir = self.state_dir / "logs"
        self.pki = _Pki(self.state_dir / "pki")
        self._run_dir = self.state_dir / "run"
        self._info_file = self._run_dir / "cluster.json"
        self._procs: dict[str, subprocess.Popen] = {}
        self._args: dict[str, list[str]] = {}  # flags each component was started with
        self._info: dict[str, Any] = {}

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
        stages = (("kwok", "kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",))
        for stage in stages:
            running = {n: pids[n] for n in stage if n in pids}
            for pid in running.values():
                self._signal(pid, signal.SIGTERM)
            for sig_deadline, sig in ((5.0, signal.SIGKILL), (5.0, None)):
                deadline = time.monotonic() + sig_deadline
                while any(self._alive(n, p) for n, p in running.items()) and time.monotonic() < deadline:
                    time.sleep(0.02)
                still = {n: p for n, p in running.items() if self._alive(n, p)}
                if not still or sig is None:
                    break
                _log(f"{', '.join(still)} ignored SIGTERM; killing")
                for pid in still.values():
                    self._signal(pid, sig)
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
        except (OSError, ssl.SSLError, http.client.HTTPException, ClusterError, KeyError):
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

    def apply(self, *objects: Mapping[str, Any], namespace: str | None = None) -> subprocess.CompletedProcess:
        """Server-side apply of the given objects (as one JSON List)."""
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        args = ["apply", "--server-side", "--force-conflicts", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        return self.kubectl(*args, input=doc)

    def get_json(self, *args: str) -> Any:
        """``kubectl get <args> -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def api(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, anonymous: bool = False
    ) -> tuple[int, Any]:
        """A raw API request: admin client certificate by default, a bearer token,
        or nothing at all (``anonymous``). Returns (HTTP status, parsed JSON or text)."""
        return self._request(method, path, body, token=token, anonymous=anonymous)

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
        """Poll ``check`` until it returns something truthy; raise ClusterError on timeout."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                result = check()
                if result:
                    return result
                last = result
            except Exception as e:  # noqa: BLE001 - reported on timeout
                last = e
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
            time.sleep(interval)

    # -- internals: processes --------------------------------------------------

    def _check_binaries(self) -> None:
        missing = [b for b in self.BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if not (self.bin_dir / self.KWOK_STAGES).exists():
            missing.append(self.KWOK_STAGES)
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
        exe = _pid_exe(pid)
        return _pid_alive(pid) and exe is not None and os.path.basename(exe) == name

    def _alive(self, name: str, pid: int) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return self._owned_pid_alive(name, pid)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen:
        log_path = self.log_file(name)
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "ETCDCTL_API")}
        with open(log_path, "wb") as log:
            log.write(f"$ {name} {' '.join(args)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=_die_with_parent if self.die_with_parent else None,
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
        self._signal(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(down_seconds)
        self._spawn("kube-apiserver", self._args["kube-apiserver"])
        self._write_info()
        self._wait("kube-apiserver /readyz after a restart", "kube-apiserver",
                   lambda: self._get("/readyz")[0] == 200, time.monotonic() + timeout)

    def _assert_alive(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise ClusterError(
                f"{name} exited with code {proc.returncode}; last lines of {self.log_file(name)}:\n"
                + _tail_file(self.log_file(name))
            )

    def _wait(self, what: str, component: str, check: Callable[[], bool], deadline: float) -> None:
        last: object = None
        while True:
            self._assert_alive(component)
            try:
                if check():
                    return
            except (OSError, ssl.SSLError, http.client.HTTPException, ValueError, ClusterError) as e:
                last = e
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out waiting for {what} (last error: {last!r}); last lines of "
                    f"{self.log_file(component)}:\n{_tail_file(self.log_file(component))}"
                )
            time.sleep(0.1)

    def _start_once(self, deadline: float) -> None:
        t0 = time.monotonic()
        for d in (self.log_dir, self._run_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self.pki.complete():
            self.pki.create()
        etcd_port, etcd_peer, api_port, kcm_port, sched_port = _free_ports(5)
        server = f"https://127.0.0.1:{api_port}"
        self._info = {"server": server, "ports": {"etcd": etcd_port, "kube-apiserver": api_port,
                                                  "kube-controller-manager": kcm_port, "kube-scheduler": sched_port},
                      "audit": self.audit}
        self._write_kubeconfigs(server)
        pki = self.pki.path

        etcd_dir = self.state_dir / "etcd"
        shutil.rmtree(etcd_dir, ignore_errors=True)
        etcd_dir.mkdir(mode=0o700)
        self._spawn("etcd", [
            "--name=omni", f"--data-dir={etcd_dir}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=omni=http://127.0.0.1:{etcd_peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # throwaway data: no fsync, much faster on slow disks
            "--quota-backend-bytes=2147483648",
            "--snapshot-count=10000",
            "--log-level=warn",
        ])
        self._wait("etcd /health", "etcd", lambda: self._etcd_healthy(etcd_port), deadline)
        t_etcd = time.monotonic()

        self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--cert-dir={self.state_dir / 'run'}",
            f"--tls-cert-file={pki('apiserver.crt')}", f"--tls-private-key-file={pki('apiserver.key')}",
            f"--client-ca-file={pki('ca.crt')}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki('sa.pub')}",
            f"--service-account-signing-key-file={pki('sa.key')}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
            *self._audit_args(),
        ])
        self._wait("kube-apiserver /readyz", "kube-apiserver", lambda: self._get("/readyz")[0] == 200, deadline)
        t_api = time.monotonic()

        self._spawn("kube-controller-manager", [
            f"--kubeconfig={self._component_kubeconfig('kube-controller-manager')}",
            "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--cert-dir={self.state_dir / 'run'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki('sa.key')}",
            f"--root-ca-file={pki('ca.crt')}",
            f"--cluster-signing-cert-file={pki('ca.crt')}",
            f"--cluster-signing-key-file={pki('ca.key')}",
            f"--cluster-name={CLUSTER_NAME}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*",
            # Fake nodes never fail; a long grace keeps a slow machine's hiccups from flipping them.
            "--node-monitor-grace-period=5m",
            "--profiling=false",
            "--v=1",
        ])
        self._spawn("kube-scheduler", [
            f"--kubeconfig={self._component_kubeconfig('kube-scheduler')}",
            "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
            f"--cert-dir={self.state_dir / 'run'}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ])
        self._spawn("kwok", [
            f"--kubeconfig={self._component_kubeconfig('kwok')}",
            f"--config={self.bin_dir / self.KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL[0]}={KWOK_NODE_LABEL[1]}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
            # Keep node Leases renewed: without heartbeats the node lifecycle controller marks
            # the fake nodes NotReady (and their pods not ready) after its grace period.
            "--node-lease-duration-seconds=40",
        ])
        self._write_info()
        self._create_nodes()
        self._wait("kube-controller-manager /healthz", "kube-controller-manager",
                   lambda: self._component_healthy(kcm_port), deadline)
        self._wait("kube-scheduler /healthz", "kube-scheduler",
                   lambda: self._component_healthy(sched_port), deadline)
        # the serviceaccount controller has run: pods can be created in "default"
        self._wait("the default service account", "kube-controller-manager",
                   lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200, deadline)
        self._wait("all nodes Ready", "kwok", self._nodes_ready, deadline)
        _log(f"etcd {t_etcd - t0:.1f}s, apiserver {t_api - t_etcd:.1f}s, "
             f"controllers+nodes {time.monotonic() - t_api:.1f}s")

    def _audit_args(self) -> list[str]:
        if not self.audit:
            return []
        policy = self._run_dir / "audit-policy.yaml"
        policy.write_text(json.dumps(AUDIT_POLICY, indent=2))  # JSON is YAML
        self.audit_log.unlink(missing_ok=True)
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
                "--audit-log-mode=blocking"]

    def _write_info(self) -> None:
        self._info["pids"] = {n: p.pid for n, p in self._procs.items()}
        self._info["bin_dir"] = str(self.bin_dir)
        tmp = self._info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._info, indent=2))
        tmp.replace(self._info_file)

    def _component_kubeconfig(self, name: str) -> Path:
        return self._run_dir / f"{name}.kubeconfig"

    def _write_kubeconfigs(self, server: str) -> None:
        ca = self.pki.path("ca.crt")
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            cfg = _kubeconfig(server, ca, self.pki.path(f"{name}.crt"), self.pki.path(f"{name}.key"), name)
            self._component_kubeconfig(name).write_text(json.dumps(cfg, indent=2))
        admin = _kubeconfig(server, ca, self.pki.path("admin.crt"), self.pki.path("admin.key"), "admin")
        tmp = self.kubeconfig.with_suffix(".tmp")
        tmp.write_text(json.dumps(admin, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.kubeconfig)

    # -- internals: HTTP ---------------------------------------------------------

    def _ssl_context(self, client_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.path("ca.crt")))
        if client_cert:
            ctx.load_cert_chain(str(self.pki.path("admin.crt")), str(self.pki.path("admin.key")))
        return ctx

    def _request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None,
        anonymous: bool = False, timeout: float = 10.0, server: str | None = None,
    ) -> tuple[int, Any]:
        port = int((server or self.server).rsplit(":", 1)[1])
        ctx = self._ssl_context(client_cert=not (token or anonymous))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
            headers["Content-Type"] = "application/merge-patch+json" if method == "PATCH" else "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def _get(self, path: str, server: str | None = None) -> tuple[int, Any]:
        return self._request("GET", path, timeout=5.0, server=server)

    @staticmethod
    def _etcd_healthy(port: int) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
        finally:
            conn.close()

    @staticmethod
    def _component_healthy(port: int) -> bool:
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
    return f"export KUBECONFIG={_sh_quote(str(c.kubeconfig))}; export PATH={_sh_quote(path)}"


def _sh_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=None,
                        help=f"cluster state (certificates, logs, etcd data); default {DEFAULT_STATE_DIR}")
    parser.add_argument("--purge", action="store_true", help="down: also delete the state dir")
    parser.add_argument("--timeout", type=float, default=180.0, help="up: seconds to wait for readiness")
    parser.add_argument("--audit", action="store_true", help="up: audit log of the operator's writes in logs/")
    args = parser.parse_args(argv)
    c = LocalCluster(args.state_dir, audit=args.audit)
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
    for name, comp in st["components"].items():
        print(f"  {name:24} {'running' if comp['alive'] else 'stopped':8} pid={comp['pid'] or '-'}")
    print("healthy" if st["running"] else "not running")
    return 0 if st["running"] else 1


if __name__ == "__main__":
    sys.exit(main())

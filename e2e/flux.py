"""Flux's source-controller and kustomize-controller as local processes against a LocalCluster.

    flux = FluxControllers(cluster, state_dir).start()   # CRDs, RBAC, both controllers, healthy
    ...                                                  # GitRepository + Kustomization objects
    flux.stop()

Built from their Go modules by e2e/build-flux.sh (cached outside the repository), with the CRDs
and ClusterRoles of the same modules. Each controller runs as its in-cluster Deployment would: in
the `flux-system` namespace, under its own ServiceAccount (a bound token in its kubeconfig) with
the module's ClusterRole; kustomize-controller is also bound to cluster-admin, as Flux's own
install binds it (config/rbac/cluster_role_binding.yaml), since it applies whatever Git holds.
source-controller serves the artifacts it packs from Git on a loopback port, which is the address
it advertises to kustomize-controller.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from e2e.cluster import LocalCluster
from e2e.procs import ClusterError, die_with_parent, free_ports, tail_file

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-flux.sh"
NAMESPACE = "flux-system"
CONTROLLERS = ("source-controller", "kustomize-controller")
KUSTOMIZE_PREFIX = {"source-controller": "source-", "kustomize-controller": "kustomize-"}  # as config/rbac names them


def bin_dir() -> Path:
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def ensure_flux() -> Path:
    """Build the controllers (once; cached outside the repo) unless they are present."""
    if subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], capture_output=True).returncode != 0:
        print(f"[flux] building source-controller and kustomize-controller into {bin_dir()} (first run only)",
              file=sys.stderr, flush=True)
        try:
            subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=sys.stderr)
        except subprocess.CalledProcessError as e:
            raise ClusterError(f"e2e/build-flux.sh failed with exit code {e.returncode} (output above)") from e
    return bin_dir()


def _probe(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class FluxControllers:
    """source-controller + kustomize-controller on loopback, for one LocalCluster."""

    def __init__(self, cluster: LocalCluster, state_dir: Path, *, binaries: Path | None = None):
        self.cluster = cluster
        self.state_dir = Path(state_dir)
        self.binaries = binaries or bin_dir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.health_ports: dict[str, int] = {}

    def log_file(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 40) -> str:
        return tail_file(self.log_file(name), lines)

    # -- install ---------------------------------------------------------------

    def install(self) -> None:
        """The CRDs of both modules, the namespace, and each controller's ServiceAccount and RBAC."""
        crds = sorted((self.binaries / "crds").glob("*.yaml"))
        self.cluster.kubectl("apply", "--server-side", *[arg for crd in crds for arg in ("-f", str(crd))])
        names = [yaml.safe_load(crd.read_text())["metadata"]["name"] for crd in crds]
        for name in names:
            self.cluster.wait_for(f"CRD {name} established", lambda name=name: self.cluster.kubectl(
                "get", f"crd/{name}", "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}',
                check=False).stdout == "True", timeout=60)
        objects: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
        for controller in CONTROLLERS:
            role = yaml.safe_load((self.binaries / "rbac" / f"{controller}.yaml").read_text())
            role["metadata"]["name"] = KUSTOMIZE_PREFIX[controller] + role["metadata"]["name"]
            subject = {"kind": "ServiceAccount", "name": controller, "namespace": NAMESPACE}
            objects += [{"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": controller, "namespace": NAMESPACE}},
                        role, _binding(role["metadata"]["name"], role["metadata"]["name"], subject)]
        objects.append(_binding("cluster-reconciler-" + NAMESPACE, "cluster-admin",
                                {"kind": "ServiceAccount", "name": "kustomize-controller", "namespace": NAMESPACE}))
        self.cluster.apply(*objects)

    # -- processes -------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> "FluxControllers":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.install()
        (self.state_dir / "artifacts").mkdir(exist_ok=True)
        storage_port, *ports = free_ports(5)
        storage = f"127.0.0.1:{storage_port}"
        common = ["--enable-leader-election=false", "--watch-all-namespaces=true", "--log-level=info",
                  "--log-encoding=console"]
        args = {
            "source-controller": [f"--storage-path={self.state_dir / 'artifacts'}", f"--storage-addr={storage}",
                                  f"--storage-adv-addr={storage}"],
            "kustomize-controller": [],
        }
        for i, controller in enumerate(CONTROLLERS):
            metrics_port, health_port = ports[2 * i], ports[2 * i + 1]
            self.health_ports[controller] = health_port
            self._spawn(controller, [*common, f"--metrics-addr=127.0.0.1:{metrics_port}",
                                     f"--health-addr=127.0.0.1:{health_port}", *args[controller]])
        for controller in CONTROLLERS:
            self._wait_ready(controller, time.monotonic() + timeout)
        return self

    def _spawn(self, controller: str, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        kubeconfig = self.cluster.service_account_kubeconfig(NAMESPACE, controller,
                                                         self.state_dir / f"{controller}.kubeconfig")
        env.update(KUBECONFIG=str(kubeconfig), RUNTIME_NAMESPACE=NAMESPACE,
                   HOME=str(self.state_dir))  # git and the controllers' caches write under $HOME
        with open(self.log_file(controller), "ab") as log:
            log.write(f"$ {controller} {' '.join(args)}\n".encode())
            log.flush()
            self.procs[controller] = subprocess.Popen(
                [str(self.binaries / controller), *args], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=self.state_dir, env=env, start_new_session=True,
                preexec_fn=die_with_parent)

    def _wait_ready(self, controller: str, deadline: float) -> None:
        proc, port = self.procs[controller], self.health_ports[controller]
        while not _probe(port, "/readyz"):
            if proc.poll() is not None:
                raise ClusterError(f"{controller} exited with {proc.returncode}:\n{self.log_tail(controller)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{controller} not ready (/readyz):\n{self.log_tail(controller)}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> "FluxControllers":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _binding(name: str, role: str, subject: dict) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [subject]}

"""A Flux-managed qwen3-omni platform on the local control plane (docs/gitops.md, examples/gitops/).

    platform = GitOpsPlatform(cluster, state_dir).start()    # Flux controllers + a Git server on loopback
    sha = platform.commit(platform.deploy_files(example), "operator and examples/omni.yaml")
    platform.bootstrap()                                     # examples/gitops/flux-system.yaml
    operator = platform.start_operator(log)                  # once Flux has created its ServiceAccount
    platform.wait_applied(sha)                               # the Kustomization Ready at that commit

The Git repository holds what examples/gitops/deploy/ describes: the operator's namespace, the chart
rendered with `helm template` (Flux's helm-controller is not used) and the OmniDeployment. Flux
applies them; the OmniDeployment's health is judged by the kstatus rules.

The operator's Deployment comes from Git like the rest, but kwok's nodes run no containers: its pod
is scheduled and reported Ready without running. The operator runs as a local process in its place,
with the pod's identity: a bound token of the ServiceAccount that Flux created from the chart, so it
holds exactly the RBAC that Git gave it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster import LocalCluster
from e2e.flux import FluxControllers
from e2e.git_server import GitHttpServer, GitRepo
from e2e.operator_process import OperatorProcess
from e2e.procs import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples" / "gitops"
FLUX_OBJECTS = EXAMPLES / "flux-system.yaml"
CHART = REPO_ROOT / "charts" / "qwen3-omni"
DEPLOY = "deploy"  # the Kustomization's path in the Git repository
RELEASE = OPERATOR_NAMESPACE = "qwen3-omni"
OPERATOR_SERVICE_ACCOUNT = "qwen3-omni-operator"
KUSTOMIZATION_KIND = "kustomizations.kustomize.toolkit.fluxcd.io"
GIT_REPOSITORY_KIND = "gitrepositories.source.toolkit.fluxcd.io"
REQUESTED_AT = "reconcile.fluxcd.io/requestedAt"  # what `flux reconcile` sets


def flux_objects() -> list[dict[str, Any]]:
    """examples/gitops/flux-system.yaml: the GitRepository and the Kustomization (both named NAME)."""
    return [doc for doc in yaml.safe_load_all(FLUX_OBJECTS.read_text()) if doc]


NAME, FLUX_NAMESPACE = (flux_objects()[0]["metadata"][key] for key in ("name", "namespace"))


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


class GitOpsPlatform:
    """Flux's controllers, a Git server with one repository, and the operator, for one LocalCluster."""

    def __init__(self, cluster: LocalCluster, state_dir: Path):
        self.cluster = cluster
        self.state_dir = Path(state_dir)
        self.flux = FluxControllers(cluster, self.state_dir / "flux")
        self.git = GitHttpServer(self.state_dir / "git" / "repos")
        self.repo: GitRepo | None = None

    def start(self) -> "GitOpsPlatform":
        self.flux.start()
        self.git.start()
        self.repo = self.git.create("platform")
        return self

    def stop(self) -> None:
        self.flux.stop()
        self.git.stop()

    # -- Git -------------------------------------------------------------------

    def rendered_chart(self) -> str:
        """The chart as examples/gitops/deploy/kustomization.yaml says to render it into Git."""
        return self.cluster.helm("template", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE,
                                 "--skip-tests").stdout

    def deploy_files(self, omni: dict[str, Any] | None) -> dict[str, str | None]:
        """deploy/ of the Git repository: examples/gitops/deploy/, the rendered chart, and `omni`
        (None: no OmniDeployment, and none listed in kustomization.yaml)."""
        kustomization = yaml.safe_load((EXAMPLES / DEPLOY / "kustomization.yaml").read_text())
        files: dict[str, str | None] = {f"{DEPLOY}/{p.name}": p.read_text() for p in (EXAMPLES / DEPLOY).glob("*.yaml")}
        files[f"{DEPLOY}/qwen3-omni-operator.yaml"] = self.rendered_chart()
        if omni is None:
            kustomization["resources"].remove("omni.yaml")
            files[f"{DEPLOY}/kustomization.yaml"] = yaml.safe_dump(kustomization, sort_keys=False)
            files[f"{DEPLOY}/omni.yaml"] = None
        else:
            files[f"{DEPLOY}/omni.yaml"] = yaml.safe_dump(omni, sort_keys=False)
        return files

    def commit(self, files: dict[str, str | None], message: str) -> str:
        """Commit and push; source-controller is asked to fetch at once (as `flux reconcile source git`
        does) instead of at its next interval."""
        assert self.repo is not None, "start() first"
        sha = self.repo.commit(files, message)
        if self.cluster.kubectl("get", GIT_REPOSITORY_KIND, NAME, "-n", FLUX_NAMESPACE, check=False).returncode == 0:
            self.request_reconcile(GIT_REPOSITORY_KIND)
        return sha

    # -- Flux ------------------------------------------------------------------

    def bootstrap(self) -> None:
        """Apply examples/gitops/flux-system.yaml, pointed at the loopback Git server."""
        assert self.repo is not None, "start() first"
        objects = flux_objects()
        for obj in objects:
            if obj["kind"] == "GitRepository":
                obj["spec"]["url"] = self.repo.url
        self.cluster.apply(*objects)

    def get(self, kind: str, name: str = "", namespace: str = FLUX_NAMESPACE) -> dict[str, Any] | None:
        out = self.cluster.kubectl("get", kind, name or NAME, "-n", namespace, "-o", "json", "--show-managed-fields",
                                   check=False)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def kustomization(self) -> dict[str, Any] | None:
        return self.get(KUSTOMIZATION_KIND)

    def request_reconcile(self, kind: str = KUSTOMIZATION_KIND) -> str:
        """Ask Flux to reconcile now (what `flux reconcile` does); the token to wait for."""
        token = f"{time.time():.6f}"
        self.cluster.kubectl("annotate", "--overwrite", kind, NAME, "-n", FLUX_NAMESPACE, f"{REQUESTED_AT}={token}")
        return token

    def wait_handled(self, token: str, kind: str = KUSTOMIZATION_KIND, timeout: float = 300) -> dict[str, Any]:
        """The object once Flux has finished the reconcile asked for with `token`."""
        return wait_until(f"{kind} to handle the reconcile request {token}",
                          lambda: (o := self.get(kind)) and o.get("status", {}).get("lastHandledReconcileAt") == token
                          and o, timeout, interval=0.5)

    def wait_applied(self, sha: str, timeout: float = 600) -> dict[str, Any]:
        """The Kustomization once it is Ready with commit `sha` applied and healthy."""
        def applied():
            ks = self.kustomization()
            ready = condition(ks, "Ready")
            return ks if ready.get("status") == "True" and ks["status"].get("lastAppliedRevision", "").endswith(sha) \
                and ks["status"].get("observedGeneration") == ks["metadata"]["generation"] else None
        return self._wait(f"the Kustomization Ready at {sha[:12]}", applied, timeout)

    def wait_failed(self, sha: str, timeout: float = 600) -> dict[str, Any]:
        """The Kustomization once its attempt at commit `sha` has failed (Ready=False)."""
        def failed():
            ks = self.kustomization()
            ready = condition(ks, "Ready")
            attempted = (ks or {}).get("status", {}).get("lastAttemptedRevision", "")
            return ks if ready.get("status") == "False" and attempted.endswith(sha) else None
        return self._wait(f"the Kustomization to fail at {sha[:12]}", failed, timeout)

    def _wait(self, what: str, check, timeout: float) -> Any:
        try:
            return wait_until(what, check, timeout, interval=0.5)
        except TimeoutError as err:
            ks = self.kustomization() or {}
            raise AssertionError(f"{err}\nKustomization status: {json.dumps(ks.get('status'), indent=1)}\n"
                                 f"kustomize-controller:\n{self.flux.log_tail('kustomize-controller', 20)}") from None

    # -- the operator ----------------------------------------------------------

    def start_operator(self, log_file: Path, timeout: float = 300) -> OperatorProcess:
        """The operator in place of the pod of its Deployment from Git: its arguments, its identity."""
        deployment = wait_until("the operator's Deployment from Git", lambda: self.get(
            "deployment", OPERATOR_SERVICE_ACCOUNT, OPERATOR_NAMESPACE), timeout, interval=0.5)
        pod = deployment["spec"]["template"]["spec"]
        account = pod["serviceAccountName"]
        wait_until("the operator's ServiceAccount from Git",
                   lambda: self.get("serviceaccount", account, OPERATOR_NAMESPACE), timeout, interval=0.5)
        kubeconfig = self.cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, account,
                                                             self.state_dir / "operator.kubeconfig")
        container = pod["containers"][0]
        command = [*container.get("command", []), *container.get("args", [])]
        if command[:2] != ["omni-operator", "run"]:
            raise RuntimeError(f"the operator's Deployment runs {command}, not `omni-operator run`")
        # Its own health and metrics ports are chosen by OperatorProcess (many pods share loopback here).
        args = [a for a in command[2:] if not a.startswith(("--health-port", "--metrics-port"))]

        class AsServiceAccount:  # the cluster, seen with the pod's credentials
            env = dict(self.cluster.env, KUBECONFIG=str(kubeconfig))

        return OperatorProcess(AsServiceAccount, log_file, *args).start()  # type: ignore[arg-type]

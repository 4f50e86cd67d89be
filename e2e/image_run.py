"""Starting a built image the way a pod starts it (``buildah run --isolation chroot``, which
shares the host network, so a server in the image is probed on loopback).

``Container.start`` applies what a pod spec says: command/args (Kubernetes semantics over the
image's entrypoint), env, the user, emptyDir volumes (host directories, mode 0777 like the
kubelet's) and, for ``readOnlyRootFilesystem``, every top-level directory of the image bound
read-only over itself (buildah has no ``--read-only``); afterwards ``writes()`` lists what the
process left in the container's own overlay layer, which catches a write the binds do not cover.
Building the images is e2e/images.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .images import ImageError, sh
from .procs import descendants

# The container runtime bind-mounts these over the image's own files (as Kubernetes does), so they
# must exist before the root turns read-only.
RUNTIME_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf")


@dataclass
class Volume:
    host: Path
    target: str
    read_only: bool = False


@dataclass
class RunSpec:
    """One container of a pod, as a container runtime would start it."""

    argv: list[str]
    uid: int
    gid: int
    env: dict[str, str] = field(default_factory=dict)
    volumes: list[Volume] = field(default_factory=list)
    read_only_root: bool = False
    workdir: str | None = None


def pod_run_spec(pod_spec: dict[str, Any], container: dict[str, Any], image: dict[str, Any], scratch: Path,
                 *, fields: dict[str, str], replace_env: dict[str, str] | None = None,
                 replace_args: dict[str, str] | None = None) -> RunSpec:
    """The RunSpec of a rendered pod's container: command/args over the image's entrypoint/cmd as
    Kubernetes does, env (``fields`` resolves downward-API fieldRefs), the securityContext's user
    and read-only root, emptyDir volumes as fresh 0777 directories under ``scratch``.
    ``replace_env``/``replace_args`` swap values (ports) so that several runs share the host network."""
    pod_sc, sc = pod_spec.get("securityContext", {}), container.get("securityContext", {})
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    image_user = (image.get("User") or "0").split(":")
    uid = int(image_user[0]) if uid is None else uid
    gid = (int(image_user[1]) if len(image_user) > 1 else 0) if gid is None else gid
    if "command" in container:
        argv = [*container["command"], *container.get("args", [])]
    else:
        argv = [*(image.get("Entrypoint") or []), *container.get("args", image.get("Cmd") or [])]
    replace_args = replace_args or {}
    argv = [replace_args.get(a, a) for a in argv]
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise ImageError(f"env {e['name']}: only values and fieldRefs are resolved here: {e}")
    for k, v in (replace_env or {}).items():
        assert k in env, f"{k} is not in the rendered env {sorted(env)}"
        env[k] = v
    by_name = {v["name"]: v for v in pod_spec.get("volumes", [])}
    volumes = []
    for m in container.get("volumeMounts", []):
        vol = by_name[m["name"]]
        if "emptyDir" in vol or "persistentVolumeClaim" in vol:  # a claim: an empty volume here
            host = scratch / m["name"]
            host.mkdir(parents=True, exist_ok=True)
            host.chmod(0o777)
        else:
            raise ImageError(f"volume {m['name']}: only emptyDir and PVC volumes are provided here: {vol}")
        volumes.append(Volume(host, m["mountPath"], bool(m.get("readOnly"))))
    return RunSpec(argv=argv, uid=uid, gid=gid, env=env, volumes=volumes,
                   read_only_root=bool(sc.get("readOnlyRootFilesystem")), workdir=container.get("workingDir"))


def process_ids(pid: int) -> tuple[list[int], list[int]]:
    """(real, effective, saved, fs) uids and gids of a process."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return [int(u) for u in uids], [int(g) for g in gids]


class Container:
    """A working container of an image (``buildah from``), mounted, for one or more runs."""

    def __init__(self, image: str):
        self.image = image
        self.id = ""
        self.rootfs = Path()
        self._baseline: set[str] = set()
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def __enter__(self) -> "Container":
        self.id = sh("buildah", "from", "--pull=never", "--quiet", self.image).stdout.strip()
        self.rootfs = Path(sh("buildah", "mount", self.id).stdout.strip())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        sh("buildah", "umount", self.id, check=False)
        sh("buildah", "rm", self.id, check=False)

    @property
    def upper(self) -> Path:
        """The container's own overlay layer: every file written outside a volume lands here."""
        upper = self.rootfs.parent / "diff"
        if not upper.is_dir():
            raise ImageError(f"no overlay upper dir next to {self.rootfs} (storage driver is not overlay?)")
        return upper

    def _layer_files(self) -> set[str]:
        return {"/" + p.relative_to(self.upper).as_posix() for p in self.upper.rglob("*")}

    def _argv(self, spec: RunSpec, argv: Sequence[str]) -> list[str]:
        args = ["buildah", "run", "--isolation", "chroot", "--network", "host", "--user", f"{spec.uid}:{spec.gid}"]
        for k, v in spec.env.items():
            args += ["--env", f"{k}={v}"]
        if spec.workdir:
            args += ["--workingdir", spec.workdir]
        if spec.read_only_root:
            covered = {v.target.strip("/").split("/")[0] for v in spec.volumes if v.target.count("/") == 1}
            # /run stays: buildah creates /run/.containerenv in it (a non-root user cannot write there
            # anyway; writes() would show it). proc, sys, dev: buildah mounts its own.
            for top in sorted(p.name for p in self.rootfs.iterdir()):
                path = self.rootfs / top
                if path.is_dir() and not path.is_symlink() and top not in covered | {"proc", "sys", "dev", "run"}:
                    args += ["--volume", f"{path}:/{top}:ro"]
        for v in spec.volumes:
            # the target with the image's symlinks resolved: buildah 1.28 follows an absolute one
            # (/var/run -> /run) on the host and mounts out of the container's sight
            target = "/" + self.path(v.target).relative_to(self.rootfs).as_posix()
            args += ["--volume", f"{v.host}:{target}{':ro' if v.read_only else ''}"]
        return [*args, self.id, "--", *argv]

    def path(self, target: str) -> Path:
        """``target`` inside the container's file system, its symlinks resolved there (the image's
        /var/run -> /run must not lead to the host's /run)."""
        path, parts, hops = self.rootfs, [p for p in target.split("/") if p], 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                path = path.parent if path != self.rootfs else path
                continue
            candidate = path / part
            if candidate.is_symlink():
                hops += 1
                if hops > 40:
                    raise ImageError(f"symlink loop at {target}")
                link = os.readlink(candidate)
                parts = [p for p in link.split("/") if p] + parts
                path = self.rootfs if link.startswith("/") else path
                continue
            path = candidate
        return path

    def prepare(self, spec: RunSpec) -> None:
        """Mount points (the runtime creates them before the root turns read-only), then a no-op run,
        so that what buildah itself leaves in the layer is not counted as the process' writes."""
        for v in spec.volumes:
            self.path(v.target).mkdir(parents=True, exist_ok=True)
        for f in RUNTIME_FILES:
            self.path(f).touch(exist_ok=True)
        sh(*self._argv(spec, ["true"]))
        self._baseline = self._layer_files()

    def run(self, spec: RunSpec, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run to completion (a Job's container)."""
        self.prepare(spec)
        return sh(*self._argv(spec, spec.argv), check=False, timeout=timeout)

    def start(self, spec: RunSpec, log_path: Path) -> subprocess.Popen:
        """Start a server in the background; its output goes to ``log_path``."""
        self.prepare(spec)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(self._argv(spec, spec.argv), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self.proc

    def server_pid(self, program: str, timeout: float = 30) -> int:
        """The pid of the process running ``program`` (a console script: python is argv[0])."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in descendants(self.proc.pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
                except OSError:
                    continue
                # buildah-chroot-exec carries the argv too, until it execs the program
                if not cmdline[0].startswith("buildah") and any(Path(a).name == program for a in cmdline[:2]):
                    return pid
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise ImageError(f"no process runs {program} under buildah run {self.proc.pid}:\n{self.log_tail()}")

    def terminate(self, pid: int, timeout: float = 30) -> int:
        """SIGTERM to the process (what the kubelet sends), then wait for the run to end."""
        assert self.proc is not None
        os.kill(pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def writes(self) -> list[str]:
        """Files the runs created or changed in the image's file system (outside the volumes)."""
        return sorted(self._layer_files() - self._baseline)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait_http(url: str, container: Container, timeout: float = 90, want: int = 200) -> str:
    """Poll until ``url`` answers ``want``; fail early when the container's process exits."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if container.proc is not None and container.proc.poll() is not None:
            raise ImageError(f"the process exited with {container.proc.returncode} before {url} answered:\n"
                             f"{container.log_tail()}")
        try:
            status, body = http_get(url, timeout=2)
            if status == want:
                return body
            last = f"HTTP {status}: {body[:200]}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.2)
    raise ImageError(f"{url} did not answer {want} within {timeout:.0f}s (last: {last}):\n{container.log_tail()}")

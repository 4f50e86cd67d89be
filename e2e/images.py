"""The container images, built for real and started the way the pods start them.

CI has no Docker engine and reaches no container registry, only package registries, so:

- **base**: a Debian bookworm root file system made by ``mmdebstrap`` from Debian's packages
  (python3, python3-venv, ca-certificates), imported into buildah's local storage. It stands in for
  the production base (``python:3.11.11-slim-bookworm``: the same Debian release and Python minor).
  The tarball is cached in ``$OMNI_CACHE/images/``.
- **wheels**: pip inside a build step does not trust this machine's TLS proxy, so the dependencies
  are downloaded on the host as binary wheels for the image's Python (cp311, this machine's
  architecture), cached by the hash of pyproject's requirements, and handed to the Dockerfiles'
  ``wheels-context`` stage through ``build/wheels/``; the project's own wheel is built fresh.
- **build**: ``buildah bud --isolation chroot`` (the default OCI isolation fails here) of
  ``images/<name>/Dockerfile`` with ``PYTHON_IMAGE=<local base>``, ``WHEELS=wheels-context`` and the
  OCI labels' build args. Release builds use the same Dockerfiles with their defaults.
- **run**: ``buildah run --isolation chroot`` shares the host network, so a server started in the
  image is probed on loopback. ``Container.start`` applies what a pod spec says: command/args
  (Kubernetes semantics over the image's entrypoint), env, the user, emptyDir volumes (host
  directories, mode 0777 like the kubelet's) and, for ``readOnlyRootFilesystem``, every top-level
  directory of the image bound read-only over itself (buildah has no ``--read-only``); afterwards
  ``writes()`` lists what the process left in the container's own overlay layer, which catches a
  write the binds do not cover (``/``, ``/run``).

    python -m e2e.images build [NAME ...]   build the CI images (operator, gateway by default)
    python -m e2e.images base               make and import the base image only

The checks themselves are the image tier of the tests (tests/test_image_tier.py, ``make images``).
Needs root (buildah's storage, mmdebstrap), buildah and mmdebstrap.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("OMNI_CACHE") or Path.home() / ".cache" / "qwen3-omni") / "images"
# Built by CI. The talker needs torch with its CUDA libraries (several GB of wheels) and the
# thinker vLLM's CUDA image: neither fits a CI run of a few minutes without a registry.
CI_IMAGES = ("operator", "gateway")
EXTRAS = {"operator": (), "gateway": ("loader",)}
REPOSITORY = "localhost/qwen3-omni"
SOURCE = "https://github.com/qwen3-omni/qwen3-omni-operator"

BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_NAME = "localhost/qwen3-omni-ci-base"
# The image's Python (bookworm's python3) and glibc: what the downloaded wheels must fit.
IMAGE_PYTHON = "3.11"
IMAGE_GLIBC_MINOR = 36
CYCLONEDX_BOM = "cyclonedx-bom==7.5.0"
WHEELS_DIR = ROOT / "build" / "wheels"  # the Dockerfiles' wheels-context stage copies it
OUT_DIR = ROOT / "build" / "images"  # SBOMs and logs
# The container runtime bind-mounts these over the image's own files (as Kubernetes does), so they
# must exist before the root turns read-only.
RUNTIME_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf")


def log(msg: str) -> None:
    print(f"[images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ImageError(RuntimeError):
    pass


def sh(*cmd: str | Path, check: bool = True, timeout: float | None = 1800, nice: bool = False,
       **kw: Any) -> subprocess.CompletedProcess:
    argv = [str(c) for c in cmd]
    if nice:  # builds share the machine with whatever else runs there
        argv = ["nice", "-n", "10", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise ImageError(f"`{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''}` exited with "
                         f"{proc.returncode}:\n{out}")
    return proc


def missing_tools() -> list[str]:
    """What this module needs and lacks (installed by `make image-tools`)."""
    missing = [t for t in ("buildah", "mmdebstrap") if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root (buildah's storage and mmdebstrap run as root here)")
    return missing


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _arch() -> str:
    return {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}[platform.machine()]


# ---------------------------------------------------------------------------------------- base


def image_exists(ref: str) -> bool:
    return sh("buildah", "inspect", "--type", "image", ref, check=False).returncode == 0


def base_image() -> str:
    """The local Debian base (made once per package list; the tarball outlives buildah's storage)."""
    key = _key(BASE_SUITE, BASE_MIRROR, BASE_PACKAGES, _arch(), 1)
    ref = f"{BASE_NAME}:{BASE_SUITE}-{key}"
    if image_exists(ref):
        return ref
    tar = CACHE / "base" / f"debian-{BASE_SUITE}-{key}.tar"
    if not tar.exists():
        tar.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        log(f"mmdebstrap {BASE_SUITE} ({', '.join(BASE_PACKAGES)}) -> {tar}")
        partial = tar.with_suffix(".partial.tar")
        # No docs, man pages or translations: nothing in the image reads them.
        sh("mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
           "--dpkgopt=path-exclude=/usr/share/locale/*", BASE_SUITE, partial, BASE_MIRROR, nice=True)
        partial.rename(tar)
        log(f"base tarball made in {time.monotonic() - t0:.0f}s")
    t0 = time.monotonic()
    ctr = sh("buildah", "from", "--pull=never", "scratch").stdout.strip()
    try:
        sh("buildah", "add", "--quiet", ctr, tar, "/", nice=True)
        sh("buildah", "config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "--env", "LANG=C.UTF-8", "--cmd", "/bin/sh", ctr)
        sh("buildah", "commit", "--quiet", "--rm", ctr, ref, nice=True)
    except BaseException:
        sh("buildah", "rm", ctr, check=False)
        raise
    log(f"imported {ref} in {time.monotonic() - t0:.0f}s")
    return ref


# -------------------------------------------------------------------------------------- wheels


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def project_version() -> str:
    return _project()["version"]


def git_revision() -> str:
    proc = sh("git", "-C", ROOT, "rev-parse", "HEAD", check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _platform_args() -> list[str]:
    # pip matches --platform literally: list every manylinux tag the image's glibc accepts.
    arch = _arch()
    tags = [f"manylinux_2_{m}_{arch}" for m in range(IMAGE_GLIBC_MINOR, 16, -1)] + [f"manylinux2014_{arch}"]
    return ["--only-binary=:all:", "--python-version", IMAGE_PYTHON, "--implementation", "cp",
            "--abi", f"cp{IMAGE_PYTHON.replace('.', '')}", *(a for t in tags for a in ("--platform", t))]


def dependency_wheels() -> Path:
    """Binary wheels of every dependency of the CI images, for the image's Python (cached)."""
    project = _project()
    reqs = sorted({*project["dependencies"],
                   *(r for extras in EXTRAS.values() for e in extras for r in project["optional-dependencies"][e])})
    directory = CACHE / "wheels" / f"cp{IMAGE_PYTHON.replace('.', '')}-{_arch()}-{_key(reqs)}"
    if (directory / ".complete").exists():
        return directory
    t0 = time.monotonic()
    log(f"downloading {len(reqs)} requirements' wheels -> {directory}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    sh(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
       *_platform_args(), "--dest", directory, *reqs)
    (directory / ".complete").write_text("\n".join(reqs) + "\n")
    log(f"wheels downloaded in {time.monotonic() - t0:.0f}s")
    return directory


def project_wheel(out: Path) -> Path:
    """The project's wheel, from a clean copy of exactly what the Dockerfiles' context holds (an
    in-tree build would reuse a stale build/lib)."""
    with tempfile.TemporaryDirectory(prefix="omni-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        for name in ("operator", "runtime"):
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "*.egg-info", "dev"))
        built = Path(tmp) / "out"
        sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--wheel-dir", built, src, nice=True)
        (wheel,) = built.glob("qwen3_omni_operator-*.whl")
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheel, out / wheel.name))


def stage_wheels() -> Path:
    """build/wheels/: the dependencies (hard links into the cache) and a fresh project wheel."""
    deps = dependency_wheels()
    shutil.rmtree(WHEELS_DIR, ignore_errors=True)
    WHEELS_DIR.mkdir(parents=True)
    for whl in deps.glob("*.whl"):
        try:
            os.link(whl, WHEELS_DIR / whl.name)
        except OSError:  # another file system
            shutil.copy2(whl, WHEELS_DIR / whl.name)
    project_wheel(WHEELS_DIR)
    return WHEELS_DIR


# --------------------------------------------------------------------------------------- build


def image_ref(name: str) -> str:
    return f"{REPOSITORY}/{name}:{project_version()}"


def build(name: str, base: str) -> str:
    """buildah bud of images/<name>/Dockerfile on the local base with build/wheels/ (staged first)."""
    ref = image_ref(name)
    old = sh("buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref, check=False)
    before = set(sh("buildah", "containers", "--quiet", "--all").stdout.split())
    t0 = time.monotonic()
    log(f"building {ref}")
    try:
        # --format docker keeps HEALTHCHECK (OCI image configs have no such field).
        sh("buildah", "bud", "--isolation", "chroot", "--format", "docker", "--pull=never", "--quiet",
           "--file", ROOT / "images" / name / "Dockerfile",
           "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", "WHEELS=wheels-context",
           "--build-arg", f"VERSION={project_version()}", "--build-arg", f"REVISION={git_revision()}",
           "--build-arg", f"SOURCE={SOURCE}", "--tag", ref, ROOT, nice=True)
    finally:
        # buildah 1.28 leaves the working containers of `RUN --mount=from=<stage>` stages behind.
        for ctr in set(sh("buildah", "containers", "--quiet", "--all").stdout.split()) - before:
            sh("buildah", "rm", ctr, check=False)
    log(f"built {ref} in {time.monotonic() - t0:.0f}s")
    if old.returncode == 0 and old.stdout.strip():
        sh("buildah", "rmi", old.stdout.strip(), check=False)  # the previous build, now untagged
    sh("buildah", "rmi", "--prune", check=False)  # the wheels stages' images
    return ref


def build_images(names: Sequence[str] = CI_IMAGES) -> dict[str, str]:
    missing = missing_tools()
    if missing:
        raise ImageError(f"missing: {', '.join(missing)} (see `make image-tools`)")
    base = base_image()
    stage_wheels()
    return {name: build(name, base) for name in names}


def image_config(ref: str) -> dict[str, Any]:
    """The image's Docker config: User, Env, Entrypoint, Cmd, WorkingDir, Labels, Healthcheck."""
    data = json.loads(sh("buildah", "inspect", "--type", "image", ref).stdout)
    return data["Docker"]["config"]


# ----------------------------------------------------------------------------------------- run


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


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


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


# ---------------------------------------------------------------------------------------- SBOM


def sbom_tool() -> Path:
    """cyclonedx-bom installed into a directory of its own (cached) for the image's Python; it is
    bind-mounted into the container for one run, never part of the image."""
    target = CACHE / "tools" / f"{CYCLONEDX_BOM.replace('==', '-')}-cp{IMAGE_PYTHON.replace('.', '')}-{_arch()}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    sh(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
       *_platform_args(), "--target", target, CYCLONEDX_BOM)
    (target / ".complete").touch()
    return target


# Runs in the image's own python with the tool on sys.path only (not PYTHONPATH: the environment
# scanned is the venv's python, started by the tool, and must not see the tool's packages).
_SBOM_SCRIPT = """
import runpy, sys
sys.path.insert(0, "/opt/omni-sbom-tool")
sys.argv = ["cyclonedx-py", "environment", "--output-format", "JSON", "--spec-version", "1.6",
            "--output-reproducible", "--output-file", "/sbom/sbom.cdx.json", "/opt/omni/bin/python"]
runpy.run_module("cyclonedx_py", run_name="__main__")
"""


def sbom(ref: str, out: Path) -> dict[str, Any]:
    """A CycloneDX SBOM of the Python environment installed in the image (/opt/omni), with the image
    as its subject (name, version, revision labels)."""
    tool = sbom_tool()
    labels = image_config(ref).get("Labels") or {}
    with tempfile.TemporaryDirectory(prefix="omni-sbom-") as tmp:
        Path(tmp).chmod(0o777)
        with Container(ref) as c:
            spec = RunSpec(argv=["python3", "-c", _SBOM_SCRIPT], uid=65532, gid=65532,
                           volumes=[Volume(tool, "/opt/omni-sbom-tool", read_only=True), Volume(Path(tmp), "/sbom")])
            proc = c.run(spec)
            if proc.returncode != 0:
                raise ImageError(f"cyclonedx-py in {ref} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        doc = json.loads((Path(tmp) / "sbom.cdx.json").read_text())
    doc.setdefault("metadata", {})["component"] = {
        "type": "container", "bom-ref": ref, "name": ref.rsplit(":", 1)[0], "version": ref.rsplit(":", 1)[1],
        "properties": [{"name": k, "value": v} for k, v in sorted(labels.items())
                       if k.startswith("org.opencontainers.image.")]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# ------------------------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.images", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build images (default: the ones CI builds)")
    b.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(CI_IMAGES)} (default: both)")
    b.add_argument("--sbom", action="store_true", help=f"also write {OUT_DIR.relative_to(ROOT)}/<name>.cdx.json")
    sub.add_parser("base", help="make and import the local Debian base image")
    args = parser.parse_args(argv)
    if args.cmd == "build" and set(args.names) - set(CI_IMAGES):
        parser.error(f"only {', '.join(CI_IMAGES)} are built here (talker: GBs of torch wheels; thinker: vLLM's image)")
    try:
        if args.cmd == "base":
            print(base_image())
            return 0
        refs = build_images(args.names or CI_IMAGES)
        for name, ref in refs.items():
            if args.sbom:
                sbom(ref, OUT_DIR / f"{name}.cdx.json")
            print(ref)
    except ImageError as e:
        print(f"e2e.images: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
- **run**: e2e/image_run.py starts a built image the way a pod starts it.

    python -m e2e.images build [NAME ...]   build the CI images (operator, gateway by default)
    python -m e2e.images base               make and import the base image only

The checks themselves are the image tier of the tests (tests/test_image_tier.py, ``make images``).
Needs root (buildah's storage, mmdebstrap), buildah and mmdebstrap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
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
    from .image_run import Container, RunSpec, Volume  # it builds on this module

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

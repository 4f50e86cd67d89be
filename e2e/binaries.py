"""The control-plane binaries: pinned versions and the cached build of e2e/build-binaries.sh."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

from e2e.procs import ClusterError

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-binaries.sh"
TOOLS = ("kubectl", "helm", "promtool", "actionlint")  # the schema tier's (`build-binaries.sh --tools`)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", *TOOLS)
KWOK_STAGES = "kwok-stages.yaml"  # kwok's default node/pod stages, written by build-binaries.sh


def pinned_versions() -> dict[str, str]:
    """The versions pinned in e2e/build-binaries.sh, e.g. {"K8S_VERSION": "v1.36.3", ...}."""
    versions = {}
    for line in BUILD_SCRIPT.read_text().splitlines():
        m = re.match(r'^([A-Z0-9_]+_VERSION)="([^"]+)"', line)
        if m:
            versions[m.group(1)] = m.group(2)
    return versions


def _script_dir(env: dict[str, str] | None = None) -> Path:
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-dir"], capture_output=True, text=True,
                         check=True, env=env)
    return Path(out.stdout.strip())


def default_bin_dir() -> Path:
    """The versioned binary directory (``$OMNI_BIN_DIR`` overrides it)."""
    if os.environ.get("OMNI_BIN_DIR"):
        return Path(os.environ["OMNI_BIN_DIR"])
    return _script_dir()


def missing_binaries(bin_dir: Path) -> list[str]:
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if not (bin_dir / KWOK_STAGES).exists():
        missing.append(KWOK_STAGES)
    return missing


def ensure_binaries(bin_dir: Path | None = None, tools_only: bool = False) -> Path:
    """Build the binaries (once; cached outside the repo) unless all are present; `tools_only`:
    only kubectl, helm, promtool and actionlint.

    Only the directory that e2e/build-binaries.sh builds into is built; any other
    ``bin_dir`` (``$OMNI_BIN_DIR``) must already hold everything."""
    env = {k: v for k, v in os.environ.items() if k != "OMNI_BIN_DIR"}
    script_dir = _script_dir(env)
    bin_dir = Path(bin_dir or default_bin_dir())
    if bin_dir.resolve() != script_dir.resolve():
        missing = [b for b in missing_binaries(bin_dir) if not tools_only or b in TOOLS]
        if missing:
            raise ClusterError(f"{bin_dir} lacks {', '.join(missing)}; build them with e2e/build-binaries.sh")
        return bin_dir
    args = ["--tools"] if tools_only else []
    if tools_only or subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], capture_output=True,
                                    env=env).returncode != 0:
        if not tools_only:
            print(f"[cluster] building the control-plane binaries into {bin_dir} (first run only; takes a while)",
                  file=sys.stderr, flush=True)
        try:  # a second run with everything present returns at once
            subprocess.run(["bash", str(BUILD_SCRIPT), *args], check=True, env=env, stdout=sys.stderr)
        except subprocess.CalledProcessError as e:
            raise ClusterError(f"e2e/build-binaries.sh failed with exit code {e.returncode} (output above)") from e
    return bin_dir


@functools.cache
def tool(name: str) -> Path:
    """One of TOOLS from the binary cache, built (`build-binaries.sh --tools`) when it is missing or
    not the pinned version."""
    path = ensure_binaries(tools_only=True) / name
    if not os.access(path, os.X_OK):
        raise ClusterError(f"no {name} in {path.parent} after e2e/build-binaries.sh --tools")
    return path

"""The release pipeline (.github/workflows/release.yml) as far as it can run here: actionlint over
the workflows, the version/registry stamping it starts with, and the defaults that make a
release's chart name the release's images."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from e2e.binaries import tool

pytestmark = pytest.mark.schema

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
RELEASE = ROOT / ".github" / "workflows" / "release.yml"
STAMP = ROOT / "images" / "stamp_release.py"


def test_workflows_pass_actionlint():
    assert WORKFLOWS, "no workflow in .github/workflows"
    # shellcheck (make system-tools) lets actionlint check the run: scripts as well
    proc = subprocess.run([str(tool("actionlint")), "-no-color", *map(str, WORKFLOWS)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_release_workflow_publishes_what_the_readme_installs():
    wf = yaml.safe_load(RELEASE.read_text())
    assert wf[True]["push"]["tags"] == ["v*"]  # `on:` parses as True in YAML 1.1
    jobs = wf["jobs"]
    images = jobs["images"]
    assert images["permissions"] == {"contents": "read", "packages": "write", "id-token": "write"}
    built = {m["image"]: set(m["platforms"].split(",")) for m in images["strategy"]["matrix"]["include"]}
    assert set(built) == {p.parent.name for p in (ROOT / "images").glob("*/Dockerfile")}
    for name in ("operator", "gateway", "talker"):
        assert built[name] == {"linux/amd64", "linux/arm64"}, name
    steps = {s.get("uses", "").split("@")[0] or s.get("name"): s for s in images["steps"]}
    build = steps["docker/build-push-action"]["with"]
    assert build["file"] == "images/${{ matrix.image }}/Dockerfile" and build["push"] is True
    build_args = dict(line.strip().split("=", 1) for line in build["build-args"].strip().splitlines())
    assert build_args["WHEELS"] == "wheels-pip" and build_args["REVISION"] == "${{ github.sha }}"
    assert {"VERSION", "SOURCE"} <= set(build_args)
    assert 'cosign sign --yes "${IMAGE}@${DIGEST}"' in steps["Sign the image (keyless)"]["run"]
    chart_runs = "\n".join(s.get("run", "") for s in jobs["chart"]["steps"])
    assert 'helm push "dist/qwen3-omni-${VERSION}.tgz" "oci://${REGISTRY}/charts"' in chart_runs
    release_runs = "\n".join(s.get("run", "") for s in jobs["github-release"]["steps"])
    assert "crds/omnideployment.yaml" in release_runs and (ROOT / "crds/omnideployment.yaml").exists()
    for job in ("images", "chart"):  # every published artifact is built from the stamped tree
        assert any("images/stamp_release.py" in s.get("run", "") for s in jobs[job]["steps"]), job
    readme = (ROOT / "README.md").read_text()
    assert "helm install qwen3-omni oci://ghcr.io/" in readme and "/charts/qwen3-omni --version" in readme


def versions(root: Path) -> dict[str, str]:
    chart = yaml.safe_load((root / "charts/qwen3-omni/Chart.yaml").read_text())
    init = (root / "operator/omni_operator/__init__.py").read_text()
    return {"pyproject": tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"],
            "__version__": re.search(r'^__version__ = "([^"]+)"', init, re.M).group(1),
            "chart version": chart["version"], "appVersion": str(chart["appVersion"])}


def test_one_version_and_one_registry_for_everything():
    """What a release stamps must already agree: the chart's appVersion tags the operator image,
    the operator's __version__ tags the runtime images it renders."""
    assert len(set(versions(ROOT).values())) == 1, versions(ROOT)
    values = yaml.safe_load((ROOT / "charts/qwen3-omni/values.yaml").read_text())
    render = (ROOT / "operator/omni_operator/rendering/meta.py").read_text()
    registry = re.search(r'^DEFAULT_IMAGE_REPOSITORY = "([^"]+)"', render, re.M).group(1)
    assert values["image"]["repository"] == f"{registry}/operator"


def release_tree(tmp_path: Path) -> Path:
    """A copy of what the release workflow stamps and builds from."""
    root = tmp_path / "tree"
    root.mkdir()
    for name in ("pyproject.toml", "README.md", "operator", "runtime", "charts", "examples"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    return root


def stamp(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STAMP), *args, "--root", str(root)], capture_output=True, text=True)


def test_stamped_release_names_its_own_images(tmp_path):
    root = release_tree(tmp_path)
    proc = stamp(root, "v1.4.0-rc.1", "--registry", "ghcr.io/acme")  # the tag, as the workflow passes it
    assert proc.returncode == 0, proc.stderr
    assert set(versions(root).values()) == {"1.4.0-rc.1"}, versions(root)
    # the operator image, from the packaged chart's defaults
    out = subprocess.run([str(tool("helm")), "template", "r", str(root / "charts/qwen3-omni"), "-n", "ns"],
                         capture_output=True, text=True, check=True).stdout
    deploy = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/operator:1.4.0-rc.1"
    # the runtime images, from the stamped operator's own defaults
    env = {**os.environ, "PYTHONPATH": f"{root / 'operator'}{os.pathsep}{root / 'runtime'}"}
    out = subprocess.run([sys.executable, "-m", "omni_operator.cli", "render", "-f", str(root / "examples/omni.yaml"),
                          "-o", "json"], capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout
    images = {c["image"] for o in json.loads(out)["items"] if o["kind"] in ("Deployment", "StatefulSet", "Job")
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images == {f"ghcr.io/acme/{role}:1.4.0-rc.1" for role in ("thinker", "talker", "gateway")}


@pytest.mark.parametrize("args", [("1.4", "--registry", "ghcr.io/acme"), ("1.4.0+build.5", "--registry", "ghcr.io/acme"),
                                  ("1.4.0", "--registry", "ghcr.io/Acme")])
def test_stamp_refuses_what_a_tag_or_registry_path_cannot_be(tmp_path, args):
    root = release_tree(tmp_path)
    proc = stamp(root, *args)
    assert proc.returncode == 1 and "stamp_release:" in proc.stderr
    assert versions(root) == versions(ROOT)  # nothing written


def test_stamp_writes_nothing_when_one_file_changed_shape(tmp_path):
    root = release_tree(tmp_path)
    render = root / "operator/omni_operator/rendering/meta.py"
    render.write_text(render.read_text().replace("DEFAULT_IMAGE_REPOSITORY = ", "DEFAULT_IMAGE_REPO = "))
    proc = stamp(root, "2.0.0", "--registry", "ghcr.io/acme")
    assert proc.returncode == 1 and "rendering/meta.py" in proc.stderr
    assert versions(root) == versions(ROOT)

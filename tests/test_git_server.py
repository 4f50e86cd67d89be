"""GitOps tier: the loopback Git server (e2e/git_server.py) speaks Git's smart HTTP protocol, so a
Git client (here the git command; in the GitOps tests Flux's source-controller) clones and fetches
from it, and sees each pushed commit."""

from __future__ import annotations

import subprocess

import pytest

from e2e.git_server import GitHttpServer

pytestmark = pytest.mark.gitops


def git(*args: str, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("version", ["0", "2"])  # go-git (Flux) speaks version 0; git itself 2
def test_a_client_clones_over_http_and_fetches_each_pushed_commit(tmp_path, version):
    with GitHttpServer(tmp_path / "repos") as server:
        repo = server.create("platform")
        first = repo.commit({"deploy/omni.yaml": "kind: OmniDeployment\n"}, "add")
        assert repo.url.startswith("http://127.0.0.1:")
        git("-c", f"protocol.version={version}", "clone", "-q", repo.url, str(tmp_path / "clone"))
        clone = tmp_path / "clone"
        assert git("rev-parse", "HEAD", cwd=clone) == first
        assert (clone / "deploy" / "omni.yaml").read_text() == "kind: OmniDeployment\n"

        second = repo.commit({"deploy/omni.yaml": None}, "remove")
        git("-c", f"protocol.version={version}", "fetch", "-q", "origin", cwd=clone)
        assert git("rev-parse", "origin/main", cwd=clone) == second != first
        assert git("ls-tree", "-r", "--name-only", "origin/main", cwd=clone) == ""


def test_an_unknown_repository_is_not_found(tmp_path):
    with GitHttpServer(tmp_path / "repos") as server:
        result = subprocess.run(["git", "clone", "-q", f"{server.url}/nothing.git", str(tmp_path / "c")],
                                capture_output=True, text=True)
        assert result.returncode != 0 and "not found" in result.stderr.lower(), result.stderr

"""pytest fixtures for the local control plane (registered in tests/conftest.py).

- ``cluster`` (session): a LocalCluster in a fresh temporary state dir, never the
  developer's .e2e-state, so tests do not disturb a running demo. Missing
  binaries are built first (e2e/build-binaries.sh). Stopped at session end.
- ``namespace`` (function): a fresh namespace, deleted after the test.

Tests that use them mark themselves with ``@pytest.mark.cluster``.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import uuid
from typing import Iterator

import pytest

from e2e.binaries import ensure_binaries
from e2e.cluster import LocalCluster
from e2e.procs import ClusterError


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    state_dir = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(state_dir, die_with_parent=True)
    # A first run builds the binaries (minutes): show its progress, not captured.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        ensure_binaries(c.bin_dir)
    atexit.register(c.stop)  # also on an interrupted session
    try:
        c.start(timeout=240, build=False)
    except ClusterError:
        c.stop()
        raise
    try:
        yield c
    finally:
        c.stop()
        atexit.unregister(c.stop)


def _namespace_name(node_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-") or "t"
    return f"{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = _namespace_name(request.node.name)
    cluster.kubectl("create", "namespace", name)
    # pods are refused until the service-account controller has made "default"
    cluster.wait_for(
        f"service account default in {name}",
        lambda: cluster.api("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
        timeout=60,
    )
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)

"""Shared fixtures, and the test tiers.

The local control plane fixture lives in e2e/ so the demo and the tests start the very same
cluster. Every test belongs to exactly one tier, the marker closest to it (a function's own
marker over its module's). `--tier=NAME` (repeatable) runs only those tiers; write it with `=`:
pytest takes a lone word that names a directory (`runtime`) for a path to collect. No `--tier`
runs every tier but images (which needs root and buildah). A test without a tier is an error.
docs/development.md lists what each tier needs and costs.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["e2e.pytest_plugin"]

TIERS = ("pure", "schema", "cluster", "runtime", "vllm", "gitops", "images")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tier", action="append", choices=TIERS, default=[],
                     help="run only the tests of this tier (repeatable; default: every tier but images)")


def tier_of(item: pytest.Item) -> str | None:
    return next((mark.name for mark in item.iter_markers() if mark.name in TIERS), None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = [item.nodeid for item in items if tier_of(item) is None]
    if untiered:
        raise pytest.UsageError("tests without a tier marker (" + ", ".join(TIERS) + "): " + ", ".join(untiered))
    wanted = set(config.getoption("tier")) or set(TIERS) - {"images"}
    keep = [item for item in items if tier_of(item) in wanted]
    config.hook.pytest_deselected(items=[item for item in items if tier_of(item) not in wanted])
    items[:] = keep

"""The core/v1 schemas the CRD embeds, as the real kube-apiserver publishes them.

    python -m e2e.core_schemas [--check]

reads ``/openapi/v3/api/v1`` from the local control plane (started if none runs) and writes
``operator/omni_operator/api/core_schemas.json``: each type of ``TYPES`` with every ``$ref`` inlined,
made structural (no defaults, no descriptions below the top) so a CRD can hold it, the way Go
operators' generated CRDs embed core types. ``--check`` exits 1 when the file differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from e2e.cluster import REPO_ROOT, LocalCluster

OUT = REPO_ROOT / "operator" / "omni_operator" / "api" / "core_schemas.json"
TYPES = {"Affinity": "io.k8s.api.core.v1.Affinity"}
_DROP = {"default", "description", "x-kubernetes-patch-strategy", "x-kubernetes-patch-merge-key"}


def inline(node: Any, schemas: dict[str, Any], top: bool = False) -> Any:
    """`node` with every $ref replaced by its schema, structural for a CRD."""
    if isinstance(node, list):
        return [inline(n, schemas) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return inline(schemas[node["$ref"].rsplit("/", 1)[-1]], schemas, top)
    if "allOf" in node and len(node["allOf"]) == 1:  # `allOf: [$ref]` carries a description or default
        rest = {k: v for k, v in node.items() if k != "allOf"}
        return inline({**rest, **node["allOf"][0]}, schemas, top)
    return {k: inline(v, schemas) for k, v in node.items() if not (k in _DROP and not (top and k == "description"))}


def core_schemas(cluster: LocalCluster) -> dict[str, Any]:
    status, spec = cluster.api("GET", "/openapi/v3/api/v1")
    if status != 200:
        raise RuntimeError(f"GET /openapi/v3/api/v1: HTTP {status}")
    schemas = spec["components"]["schemas"]
    return {name: inline(schemas[full], schemas, top=True) for name, full in TYPES.items()}


def render(schemas: dict[str, Any]) -> str:
    return json.dumps(schemas, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.core_schemas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the vendored file differs")
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.state_dir)
    started = not cluster.is_running()
    cluster.start(timeout=240)
    try:
        text = render(core_schemas(cluster))
    finally:
        if started:
            cluster.stop()
    if args.check:
        stale = not OUT.exists() or OUT.read_text() != text
        print(f"{OUT} is {'stale: run python -m e2e.core_schemas' if stale else 'current'}")
        return 1 if stale else 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

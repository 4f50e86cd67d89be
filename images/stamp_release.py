#!/usr/bin/env python3
"""Stamp a release's version and registry into the tree, before the release workflow builds it.

    python3 images/stamp_release.py 1.2.3 --registry ghcr.io/acme

One version for everything a user gets from a release:
  pyproject.toml                      [project] version (the wheel in every image)
  operator/omni_operator/__init__.py  __version__: the tag of the runtime images the operator renders
  charts/qwen3-omni/Chart.yaml        version and appVersion: the operator image's default tag
and one registry for all four images (a fork releases to its own ghcr.io/<owner>):
  charts/qwen3-omni/values.yaml       image.repository = <registry>/operator
  operator/omni_operator/rendering/meta.py  DEFAULT_IMAGE_REPOSITORY = <registry> (<registry>/<role>:<version>)

Each setting must be found exactly once: a file that changed shape fails the release instead
of shipping a half-stamped tree. Standard library only (runs before anything is installed).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# A SemVer 2.0 version without build metadata: a valid chart version and image tag, and a
# version pip accepts (1.2.3-rc.1 normalises to 1.2.3rc1).
VERSION = re.compile(r"\d+\.\d+\.\d+(-[0-9A-Za-z]+(\.[0-9A-Za-z]+)*)?")
REGISTRY = re.compile(r"[a-z0-9.-]+(:\d+)?(/[a-z0-9._-]+)+")


def edits(version: str, registry: str) -> dict[str, list[tuple[str, str]]]:
    """file -> [(pattern, replacement)]; group 1 of each pattern is the part kept."""
    return {
        "pyproject.toml": [(r'(?m)^(version = )"[^"]*"$', rf'\g<1>"{version}"')],
        "operator/omni_operator/__init__.py": [(r'(?m)^(__version__ = )"[^"]*"$', rf'\g<1>"{version}"')],
        "operator/omni_operator/rendering/meta.py": [(r'(?m)^(DEFAULT_IMAGE_REPOSITORY = )"[^"]*"$', rf'\g<1>"{registry}"')],
        "charts/qwen3-omni/Chart.yaml": [(r"(?m)^(version: ).*$", rf"\g<1>{version}"),
                                         (r"(?m)^(appVersion: ).*$", rf'\g<1>"{version}"')],
        # the first `repository:` under the top-level `image:` block
        "charts/qwen3-omni/values.yaml": [(r"(?m)^(image:\n(?:[ \t]*#.*\n)*[ \t]+repository: ).*$",
                                           rf"\g<1>{registry}/operator")],
    }


def stamp(root: Path, version: str, registry: str) -> list[str]:
    if not VERSION.fullmatch(version):
        raise ValueError(f"{version!r} is not a SemVer version (MAJOR.MINOR.PATCH[-PRERELEASE])")
    if not REGISTRY.fullmatch(registry):
        raise ValueError(f"{registry!r} is not a lower-case registry path such as ghcr.io/owner")
    texts = {}
    for rel, subs in edits(version, registry).items():
        text = (root / rel).read_text()
        for pattern, replacement in subs:
            text, n = re.subn(pattern, replacement, text)
            if n != 1:
                raise ValueError(f"{rel}: {pattern!r} matched {n} times, not once")
        texts[rel] = text
    for rel, text in texts.items():  # nothing is written unless every file could be stamped
        (root / rel).write_text(text)
    return sorted(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="e.g. 1.2.3 (a leading v, as in the git tag, is dropped)")
    parser.add_argument("--registry", required=True, help="where the images go, e.g. ghcr.io/acme")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    try:
        changed = stamp(args.root, args.version.removeprefix("v"), args.registry)
    except (ValueError, OSError) as e:
        print(f"stamp_release: {e}", file=sys.stderr)
        return 1
    print(f"stamped {args.version.removeprefix('v')} / {args.registry} into {', '.join(changed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

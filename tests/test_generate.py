"""The generated files (tools/generate.py): fresh in the repository, and rewritten from the code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from omni_operator.api.crd import build_crd, dump_yaml
from tools.generate import generated_files
from tools.sizing_table import TABLE_BEGIN, TABLE_END, gpus_per_replica_table, marked_block, replace_marked_block

from .helpers import ROOT

pytestmark = pytest.mark.schema


def generate(*args: str, root=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.generate", "--root", str(root), *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_generated_files_are_fresh():
    result = generate("--check")
    assert result.returncode == 0, result.stderr


def test_the_sizing_page_table_is_what_the_code_computes():
    page = (ROOT / "docs" / "sizing.md").read_text()
    assert marked_block(page) == gpus_per_replica_table(), "docs/sizing.md is stale: run `python -m tools.generate`"


def test_generate_writes_what_is_stale_and_check_names_it(tmp_path):
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "sizing.md"
    page.write_text(f"# x\n{TABLE_BEGIN}\nstale\n{TABLE_END}\ntail\n")
    check = generate("--check", root=tmp_path)
    assert check.returncode == 1 and "docs/sizing.md" in check.stderr and "crds/omnideployment.yaml" in check.stderr
    assert generate(root=tmp_path).returncode == 0
    assert page.read_text() == f"# x\n{TABLE_BEGIN}\n{gpus_per_replica_table()}{TABLE_END}\ntail\n"
    assert dump_yaml(build_crd()) in (tmp_path / "crds" / "omnideployment.yaml").read_text()
    assert set(generated_files(tmp_path)) == {p for p in tmp_path.rglob("*") if p.is_file()}
    assert generate("--check", root=tmp_path).returncode == 0
    page.write_text("no markers\n")
    assert generate(root=tmp_path).returncode == 2


def test_table_rows_follow_the_sizing():
    table = gpus_per_replica_table(video_seconds=(15,), concurrency=(1, 8), gpu_gib=(80,))
    rows = [line for line in table.splitlines() if line.startswith("| 15 s")]
    # One request fits one 80 GiB GPU; eight at 17408 tokens need two.
    assert rows == ["| 15 s | 1 | 17408 | 68.74 GB | 1 |", "| 15 s | 8 | 17408 | 68.74 GB | 2 |"]


def test_replace_marked_block_keeps_everything_outside_the_markers():
    text = "intro\n<!-- b -->\nold\n<!-- e -->\noutro\n"
    out = replace_marked_block(text, "new\n", "<!-- b -->", "<!-- e -->")
    assert out == "intro\n<!-- b -->\nnew\n<!-- e -->\noutro\n"
    assert marked_block(out, "<!-- b -->", "<!-- e -->") == "new\n"
    with pytest.raises(ValueError, match="markers"):
        replace_marked_block("no markers", "x", "<!-- b -->", "<!-- e -->")


def test_the_api_reference_covers_every_spec_field():
    reference = (ROOT / "docs" / "reference" / "api.md").read_text()
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for field in ("thinker.extraArgs", "talker.maxQueue", "talker.maxInflight", "gateway.apiKeySecretRef",
                  "gateway.maxRequestBytes", "thinker.gpu.resourceName", *spec):
        assert f"`spec.{field}`" in reference, field

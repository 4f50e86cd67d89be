"""bench.talker_device_bench rehearsed on CPU: the tiny model through both decode paths (its GPU
run measures the full-size talker), and the full-size dimensions built on the meta device."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.runtime


def test_both_paths_run_and_write_their_figures(tmp_path, capsys):
    from bench.talker_device_bench import main

    assert main(["--scale", "tiny", "--device", "cpu", "--out", str(tmp_path), "--concurrency", "1", "3",
                 "--codes", "10", "--rounds", "2", "--prompt-tokens", "20"]) == 0
    result = json.loads((tmp_path / "talker_device_bench.json").read_text())
    assert set(result["modes"]) == {"eager", "graphs"}
    for mode in result["modes"].values():
        for n in ("1", "3"):
            row = mode["by_concurrency"][n]
            assert row["requests"] == 2 * int(n) and row["audio_s_per_s"] > 0 and row["rtf_p50"] > 0
            assert 0 < row["ttfa_p50_ms"] <= row["ttfa_p99_ms"] and row["step_ms_p50"] > 0
            assert 0 < row["code2wav_busy"] <= 1.05
    assert result["ratios"]["concurrency"] == 3 and result["ratios"]["speedup"] > 0
    same = result["same_codes"]["graphs"]  # float32 on CPU: every frame, sampled ones included
    assert same["greedy_identical"] and same["equal"] == same["frames"] == 8 * 39
    assert result["floor_ms"] == {} and int(result["step_bytes"]["3"]) > int(result["step_bytes"]["1"])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("ratios at 3 concurrent: graphs/eager audio throughput") and "goal >= 3" in last


def test_the_full_size_talker_has_the_checkpoint_dimensions(capsys):
    from bench.talker_device_bench import main

    assert main(["--scale", "full", "--dry-run", "--concurrency", "1", "64"]) == 0
    out = capsys.readouterr().out
    dims = json.loads(out[out.index("{"):out.index("}") + 1])
    assert (dims["layers"], dims["experts"], dims["experts_per_token"], dims["code_groups"]) == (20, 128, 6, 16)
    assert dims["kv_bytes_per_token"] == 20 * 1024 and dims["dtype"] == "bfloat16"  # the sizing's figure
    assert 3.0e9 < dims["talker_params"] < 3.3e9 and 0.25e9 < dims["talker_active_params"] < 0.35e9
    # DESIGN.md's floor arithmetic: ~6 GB of talker weights plus ~2.4 GB of code predictor at 64 streams
    n64 = next(line for line in out.splitlines() if line.startswith("N= 64"))
    assert 8.0 < float(n64.split("reads ")[1].split(" GB")[0]) < 9.5

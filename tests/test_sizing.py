"""Tier 1: VRAM-table sizing (pure)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_operator.sizing import (GIB_IN_GB, TABLE_GB, TABLE_SECONDS, SizingRequest, estimate_gb,
                                  max_model_len, size, table_row)

TALKER = tuple(round(i - t, 2) for i, t in zip(TABLE_GB["instruct"], TABLE_GB["thinking"]))


@pytest.mark.parametrize("index,seconds", list(enumerate(TABLE_SECONDS)))
def test_every_table_point_is_reproduced(index, seconds):
    assert estimate_gb("thinker", "instruct", seconds).gigabytes == TABLE_GB["thinking"][index]
    assert estimate_gb("thinker", "thinking", seconds).gigabytes == TABLE_GB["thinking"][index]
    assert estimate_gb("combined", "instruct", seconds).gigabytes == TABLE_GB["instruct"][index]
    assert estimate_gb("talker", "instruct", seconds).gigabytes == pytest.approx(TALKER[index], abs=0.01)
    assert not estimate_gb("thinker", "instruct", seconds).extrapolated


def test_talker_share_is_the_row_difference():
    assert TALKER == (10.11, 10.73, 11.98, 13.16)


@pytest.mark.parametrize("lo,hi", list(zip(TABLE_SECONDS, TABLE_SECONDS[1:])))
def test_midpoints_interpolate_linearly(lo, hi):
    i = TABLE_SECONDS.index(lo)
    mid = (lo + hi) / 2
    want = (TABLE_GB["instruct"][i] + TABLE_GB["instruct"][i + 1]) / 2
    assert estimate_gb("combined", "instruct", mid).gigabytes == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize("seconds", [0, 1, 14.9])
def test_below_fifteen_seconds_uses_the_fifteen_second_figure(seconds):
    assert estimate_gb("combined", "instruct", seconds).gigabytes == 78.85


def test_beyond_the_table_extrapolates_with_the_last_slope_and_says_so():
    est = estimate_gb("thinker", "thinking", 180)
    slope = (131.65 - 95.76) / 60
    assert est.extrapolated
    assert est.gigabytes == pytest.approx(131.65 + slope * 60, abs=0.01)
    assert "120 s" in est.note and "extrapolated" in est.note
    result = size(SizingRequest(role="thinker", variant="thinking", video_seconds=180, gpu_memory_gib=80))
    assert any("extrapolated" in n for n in result.notes)


def test_negative_video_seconds_is_refused():
    with pytest.raises(ValueError, match="video seconds"):
        estimate_gb("thinker", "instruct", -1)


@settings(max_examples=300, deadline=None)
@given(a=st.floats(0, 600), b=st.floats(0, 600), role=st.sampled_from(["thinker", "talker", "combined"]))
def test_estimate_is_monotone_in_video_seconds(a, b, role):
    lo, hi = sorted((a, b))
    assert estimate_gb(role, "instruct", lo).gigabytes <= estimate_gb(role, "instruct", hi).gigabytes


@settings(max_examples=300, deadline=None)
@given(seconds=st.floats(0, 600), role=st.sampled_from(["thinker", "talker", "combined"]),
       variant=st.sampled_from(["instruct", "thinking"]))
def test_estimate_is_never_under_the_table(seconds, role, variant):
    if role == "talker" and variant != "instruct":
        return
    row = table_row(role, variant)
    at_or_below = [gb for t, gb in zip(TABLE_SECONDS, row) if t <= seconds] or [row[0]]
    assert estimate_gb(role, variant, seconds).gigabytes >= round(at_or_below[-1], 2)


@settings(max_examples=300, deadline=None)
@given(seconds=st.floats(0, 200), gib=st.sampled_from([16, 24, 40, 48, 80, 94, 141, 192]),
       per_node=st.sampled_from([1, 2, 4, 8]), nodes=st.integers(1, 4), util=st.floats(0.5, 0.98))
def test_chosen_gpu_count_is_the_smallest_power_of_two_that_holds_the_estimate(seconds, gib, per_node, nodes, util):
    result = size(SizingRequest(role="thinker", variant="instruct", video_seconds=seconds, gpu_memory_gib=gib,
                                gpus_per_node=per_node, max_nodes_per_replica=nodes, utilization=util,
                                images_per_prompt=0))
    usable = gib * GIB_IN_GB * util
    if result.fits:
        g = result.gpus_per_replica
        assert g & (g - 1) == 0, "power of two"
        assert g * usable >= result.estimated_gb - 0.01
        assert g == 1 or (g // 2) * usable < result.estimated_gb + 0.01
        assert result.pods_per_replica * result.gpus_per_pod == g
        assert result.gpus_per_pod <= per_node
        assert result.pods_per_replica <= nodes
    else:
        # Refused only when even the largest allowed replica can't hold it (or the context is too long).
        # The largest power-of-two GPU count that nodes x (power-of-two GPUs per node) allows.
        biggest = 2 ** int(math.log2(2 ** int(math.log2(per_node)) * nodes))
        assert biggest * usable < result.estimated_gb or "context" in result.reason
        assert result.vllm_args == []


def test_fifteen_second_instruct_on_one_h100_needs_two_gpus_combined_but_one_for_the_thinker():
    combined = size(SizingRequest(role="combined", variant="instruct", video_seconds=15, gpu_memory_gib=80))
    thinker = size(SizingRequest(role="thinker", variant="instruct", video_seconds=15, gpu_memory_gib=80))
    assert (combined.gpus_per_replica, thinker.gpus_per_replica) == (2, 1)


def test_refusal_names_the_numbers():
    result = size(SizingRequest(role="thinker", variant="instruct", video_seconds=15, gpu_memory_gib=16,
                                gpus_per_node=4))
    assert not result.fits
    assert "68.74 GB" in result.reason
    assert "4 x 16 GiB" in result.reason
    assert "a node of this pool has 4 GPUs" in result.reason


def test_a_replica_may_span_nodes_when_allowed():
    req = dict(role="thinker", variant="thinking", video_seconds=120, gpu_memory_gib=24, gpus_per_node=4)
    assert not size(SizingRequest(**req)).fits
    result = size(SizingRequest(**req, max_nodes_per_replica=2))
    assert result.fits
    assert (result.gpus_per_replica, result.pods_per_replica, result.gpus_per_pod) == (8, 2, 4)
    assert result.vllm_args[result.vllm_args.index("--tensor-parallel-size") + 1] == "4"
    assert result.vllm_args[result.vllm_args.index("--pipeline-parallel-size") + 1] == "2"


def test_talker_uses_one_gpu_and_no_vllm():
    result = size(SizingRequest(role="talker", variant="instruct", video_seconds=60, gpu_memory_gib=24))
    assert result.fits and result.gpus_per_replica == 1 and result.vllm_args == []
    too_small = size(SizingRequest(role="talker", variant="instruct", video_seconds=60, gpu_memory_gib=12))
    assert not too_small.fits and "11.98 GB" in too_small.reason


def test_thinking_variant_has_no_talker():
    with pytest.raises(ValueError, match="no talker"):
        size(SizingRequest(role="talker", variant="thinking", video_seconds=15, gpu_memory_gib=24))


def test_vllm_arguments_carry_every_knob():
    result = size(SizingRequest(role="thinker", variant="instruct", video_seconds=60, gpu_memory_gib=80,
                                audio_minutes=5, images_per_prompt=2, max_num_seqs=16, utilization=0.85))
    args = dict(zip(result.vllm_args[::2], result.vllm_args[1::2]))
    assert args["--tensor-parallel-size"] == str(result.tensor_parallel_size) == "2"
    assert args["--max-num-seqs"] == "16"
    assert args["--gpu-memory-utilization"] == "0.85"
    assert json.loads(args["--limit-mm-per-prompt"]) == {"image": 2, "video": 1, "audio": 1}
    model_len = int(args["--max-model-len"])
    assert model_len % 1024 == 0 and model_len >= 60 * 256 + 5 * 60 * 12.5


def test_context_longer_than_the_model_is_refused():
    assert max_model_len(240, 0, 0) > 65536
    result = size(SizingRequest(role="thinker", variant="instruct", video_seconds=240, gpu_memory_gib=141))
    assert not result.fits and "65536" in result.reason

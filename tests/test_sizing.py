"""Tier 1: VRAM-table sizing (pure)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omni_operator.sizing.kv_cache import QWEN3_OMNI_30B_A3B, KvCacheShape, ModelArchitecture, architecture_from_config
from omni_operator.sizing.model_card import GIB_IN_GB, TABLE_GB, TABLE_SECONDS, estimate_gb, max_model_len, table_row
from omni_operator.sizing.replicas import TALKER_GRAPHS_GB, TALKER_MAX_STREAMS, SizingRequest, size

pytestmark = pytest.mark.pure


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
        assert biggest * usable < result.estimated_gb or "the model's context" in result.reason
        assert result.vllm_args == []


def test_fifteen_second_instruct_on_one_h100_needs_two_gpus_combined_but_one_for_the_thinker():
    one = dict(video_seconds=15, gpu_memory_gib=80, max_num_seqs=1)  # the table's single request
    combined = size(SizingRequest(role="combined", variant="instruct", **one))
    thinker = size(SizingRequest(role="thinker", variant="instruct", **one))
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


# ----------------------------------------------------------------------------- concurrency: KV cache on top

THINKER_KV_PER_TOKEN = 2 * 48 * 4 * 128 * 2  # K and V x layers x KV heads x head dim x bf16
TALKER_KV_PER_TOKEN = 2 * 20 * 2 * 128 * 2

# The parts of Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json that size the KV cache.
CHECKPOINT_CONFIG = {
    "architectures": ["Qwen3OmniMoeForConditionalGeneration"], "dtype": "bfloat16", "model_type": "qwen3_omni_moe",
    "thinker_config": {"text_config": {"num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                                       "head_dim": 128, "hidden_size": 2048, "dtype": None}},
    "talker_config": {"text_config": {"num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 2,
                                      "head_dim": 128, "hidden_size": 1024, "dtype": None}},
}


def test_kv_cache_per_token_of_the_checkpoint():
    assert QWEN3_OMNI_30B_A3B.thinker.bytes_per_token == THINKER_KV_PER_TOKEN == 96 * 1024
    assert QWEN3_OMNI_30B_A3B.talker.bytes_per_token == TALKER_KV_PER_TOKEN == 20 * 1024
    assert architecture_from_config(CHECKPOINT_CONFIG) == QWEN3_OMNI_30B_A3B


def test_the_issue_example_does_not_fit_one_gpu_and_says_how_many_sequences_would():
    """Thinking, 15 s video, 17408 tokens, 8 sequences: 68.74 GB + 7 x 17408 x 96 KiB > 77.31 GB usable."""
    req = dict(role="thinker", variant="thinking", video_seconds=15, gpu_memory_gib=80, max_num_seqs=8)
    one_gpu = size(SizingRequest(**req, gpus_per_node=1))
    assert one_gpu.context_tokens == 17408
    assert one_gpu.table_gb == 68.74
    assert one_gpu.kv_bytes_per_token == THINKER_KV_PER_TOKEN
    assert one_gpu.concurrent_kv_tokens == 7 * 17408
    assert one_gpu.concurrent_kv_gb == round(7 * 17408 * THINKER_KV_PER_TOKEN / 1e9, 2) == 11.98
    assert one_gpu.estimated_gb == 80.72
    assert not one_gpu.fits and one_gpu.vllm_args == []
    assert "fits 6 concurrent sequences at this context on 1 x 80 GiB; asked for 8" in one_gpu.reason
    assert "68.74 GB for one request + 11.98 GB KV cache of 7 more sequences" in one_gpu.reason
    # A node of 8 GPUs: two of them, and a note that the concurrency decided it.
    two = size(SizingRequest(**req))
    assert two.fits and two.gpus_per_replica == 2
    assert any("1 x 80 GiB GPU would hold 6 concurrent sequences" in n for n in two.notes)
    # The six that fit, fit; the seventh needs a second GPU.
    assert size(SizingRequest(**{**req, "max_num_seqs": 6}, gpus_per_node=1)).gpus_per_replica == 1
    assert size(SizingRequest(**{**req, "max_num_seqs": 7})).gpus_per_replica == 2


def test_one_sequence_is_exactly_the_table():
    result = size(SizingRequest(role="thinker", variant="thinking", video_seconds=15, gpu_memory_gib=80,
                                max_num_seqs=1))
    assert result.estimated_gb == result.table_gb == 68.74
    assert result.concurrent_kv_tokens == 0 and result.concurrent_kv_gb == 0
    assert result.gpus_per_replica == 1


def test_the_talker_adds_the_kv_cache_of_its_own_text_model_and_its_cuda_graphs():
    result = size(SizingRequest(role="talker", variant="instruct", video_seconds=30, gpu_memory_gib=24,
                                max_num_seqs=16))
    assert result.kv_bytes_per_token == TALKER_KV_PER_TOKEN
    assert result.concurrent_kv_tokens == 15 * result.context_tokens
    assert result.graphs_gb == TALKER_GRAPHS_GB
    assert result.estimated_gb == pytest.approx(
        10.73 + TALKER_GRAPHS_GB + 15 * result.context_tokens * TALKER_KV_PER_TOKEN / 1e9, abs=0.01)
    assert result.fits and result.kv_cache_bytes_per_gpu == 0 and result.vllm_args == []
    assert "2.00 GB CUDA graphs" in result.reason
    # A two-minute video's context: a 24 GiB GPU holds 10 syntheses, not 16.
    long = size(SizingRequest(role="talker", variant="instruct", video_seconds=120, gpu_memory_gib=24,
                              images_per_prompt=0, max_num_seqs=16, concurrency_setting="talker.maxInflight"))
    assert not long.fits
    assert ("fits 10 concurrent sequences at this context on 1 x 24 GiB; asked for 16 (talker.maxInflight)"
            in long.reason)
    assert size(SizingRequest(role="talker", variant="instruct", video_seconds=120, gpu_memory_gib=24,
                              images_per_prompt=0, max_num_seqs=10)).fits


@pytest.mark.parametrize("gib, seconds, streams", [(24, 15, 45), (24, 30, 32), (24, 120, 10), (80, 15, 64),
                                                    (80, 120, 64), (141, 120, 64)])
def test_an_unset_talker_concurrency_is_what_its_gpu_holds(gib, seconds, streams):
    auto = size(SizingRequest(role="talker", variant="instruct", video_seconds=seconds, gpu_memory_gib=gib,
                              images_per_prompt=0, max_num_seqs=None))
    assert auto.fits and auto.concurrent_sequences == streams <= TALKER_MAX_STREAMS
    assert auto.estimated_gb <= auto.usable_gb_per_gpu
    assert f"talker.maxInflight unset: {streams} concurrent streams per {gib} GiB GPU" in " ".join(auto.notes)
    if streams < TALKER_MAX_STREAMS:  # one more would not fit
        assert not size(SizingRequest(role="talker", variant="instruct", video_seconds=seconds, gpu_memory_gib=gib,
                                      images_per_prompt=0, max_num_seqs=streams + 1)).fits
    with pytest.raises(ValueError, match="only the talker"):
        size(SizingRequest(role="thinker", variant="instruct", video_seconds=seconds, gpu_memory_gib=gib,
                           max_num_seqs=None))


def test_a_talker_gpu_too_small_for_one_stream_is_refused():
    tiny = size(SizingRequest(role="talker", variant="instruct", video_seconds=15, gpu_memory_gib=8,
                              max_num_seqs=None))
    assert not tiny.fits and tiny.concurrent_sequences == 1 and "use larger GPUs" in tiny.reason


def test_combined_holds_the_kv_cache_of_thinker_and_talker():
    result = size(SizingRequest(role="combined", variant="instruct", video_seconds=15, gpu_memory_gib=141))
    assert result.kv_bytes_per_token == THINKER_KV_PER_TOKEN + TALKER_KV_PER_TOKEN


def test_vllm_reserves_every_sequence_at_full_context_per_gpu():
    result = size(SizingRequest(role="thinker", variant="thinking", video_seconds=15, gpu_memory_gib=80,
                                max_num_seqs=8))
    args = dict(zip(result.vllm_args[::2], result.vllm_args[1::2]))
    assert result.tensor_parallel_size == 2
    # Two GPUs split the 4 KV heads: each holds half of every token.
    per_gpu = 8 * 17408 * THINKER_KV_PER_TOKEN // 2
    assert int(args["--kv-cache-memory-bytes"]) == result.kv_cache_bytes_per_gpu == per_gpu
    assert (args["--max-num-seqs"], args["--max-model-len"]) == ("8", "17408")
    # What each GPU holds stays within what it may use.
    assert result.table_gb / 2 + per_gpu / 1e9 <= result.usable_gb_per_gpu


def test_tensor_parallel_beyond_the_kv_heads_keeps_a_whole_head_on_every_gpu():
    result = size(SizingRequest(role="thinker", variant="thinking", video_seconds=60, gpu_memory_gib=24,
                                max_num_seqs=2))
    assert result.tensor_parallel_size == 8
    one_head = 2 * 48 * 1 * 128 * 2  # 4 KV heads over 8 GPUs: each keeps one, not half of one
    assert result.kv_cache_bytes_per_gpu == 2 * result.context_tokens * one_head
    assert result.concurrent_kv_gb == round(result.context_tokens * one_head * 8 / 1e9, 2)
    assert "2x as each GPU keeps whole KV heads and layers" in result.reason


def test_pipeline_stages_split_the_layers():
    result = size(SizingRequest(role="thinker", variant="thinking", video_seconds=120, gpu_memory_gib=24,
                                gpus_per_node=4, max_nodes_per_replica=2, max_num_seqs=4))
    assert (result.tensor_parallel_size, result.pipeline_parallel_size) == (4, 2)
    assert result.kv_cache_bytes_per_gpu == 4 * result.context_tokens * (2 * 24 * 1 * 128 * 2)


def test_a_larger_model_config_needs_more_memory():
    bigger = ModelArchitecture(thinker=KvCacheShape(layers=96, kv_heads=8, head_dim=128, dtype_bytes=4),
                               talker=QWEN3_OMNI_30B_A3B.talker)
    req = dict(role="thinker", variant="thinking", video_seconds=15, gpu_memory_gib=141, max_num_seqs=8)
    default, custom = size(SizingRequest(**req)), size(SizingRequest(**req, architecture=bigger))
    assert custom.kv_bytes_per_token == 8 * THINKER_KV_PER_TOKEN
    assert custom.estimated_gb > default.estimated_gb
    assert custom.gpus_per_replica > default.gpus_per_replica


def test_architecture_from_config_falls_back_where_the_config_is_silent():
    no_gqa_no_head_dim = {"torch_dtype": "float32", "thinker_config": {"text_config": {
        "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}}}
    arch = architecture_from_config(no_gqa_no_head_dim)
    assert arch.thinker == KvCacheShape(layers=2, kv_heads=4, head_dim=16, dtype_bytes=4)
    assert arch.talker == QWEN3_OMNI_30B_A3B.talker  # a checkpoint without a talker (Thinking, Captioner)
    with pytest.raises(ValueError, match="thinker_config.text_config"):
        architecture_from_config({"model_type": "llama", "num_hidden_layers": 32})
    with pytest.raises(ValueError, match="unknown dtype"):
        architecture_from_config({**CHECKPOINT_CONFIG, "dtype": "int3"})


@pytest.mark.runtime
def test_architecture_from_the_tiny_checkpoint_that_transformers_writes(tmp_path):
    pytest.importorskip("transformers")
    from omni_runtime.tiny import build_config

    build_config().save_pretrained(tmp_path)
    arch = architecture_from_config(json.loads((tmp_path / "config.json").read_text()))
    assert (arch.thinker.layers, arch.thinker.kv_heads, arch.thinker.head_dim) == (3, 2, 32)
    assert (arch.talker.layers, arch.talker.kv_heads, arch.talker.head_dim) == (1, 2, 8)


# Property tests: the same guarantees as the table's sizing, now over concurrency and architecture too.

# Inputs whose context stays within the model's 65536 tokens (the context refusal is tested above).
_requests = st.fixed_dictionaries({
    "role": st.sampled_from(["thinker", "talker", "combined"]),
    "video_seconds": st.floats(0, 150),
    "gpu_memory_gib": st.sampled_from([16, 24, 40, 48, 80, 94, 141, 192]),
    "gpus_per_node": st.sampled_from([1, 2, 4, 8]),
    "max_nodes_per_replica": st.integers(1, 4),
    "utilization": st.floats(0.5, 0.98),
    "audio_minutes": st.floats(0, 5),
    "images_per_prompt": st.integers(0, 8),
    "max_num_seqs": st.integers(1, 64),
    "layers": st.integers(1, 96),
    "kv_heads": st.sampled_from([1, 2, 4, 8, 16]),
    "head_dim": st.sampled_from([64, 128, 256]),
    "dtype_bytes": st.sampled_from([1, 2, 4]),
})


def _size(params: dict):
    p = dict(params)
    shape = KvCacheShape(p.pop("layers"), p.pop("kv_heads"), p.pop("head_dim"), p.pop("dtype_bytes"))
    return size(SizingRequest(variant="instruct", architecture=ModelArchitecture(thinker=shape, talker=shape), **p))


def _gpus(result) -> float:
    return result.gpus_per_replica if result.fits else math.inf


@settings(max_examples=400, deadline=None)
@given(params=_requests,
       grow=st.sampled_from(["video_seconds", "audio_minutes", "images_per_prompt", "max_num_seqs", "layers",
                             "kv_heads", "head_dim", "dtype_bytes"]),
       factor=st.sampled_from([2, 3, 4]))
def test_more_demand_never_needs_fewer_gpus_nor_less_memory(params, grow, factor):
    bigger = {**params, grow: params[grow] * factor if params[grow] else 1}
    small, large = _size(params), _size(bigger)
    assert _gpus(small) <= _gpus(large)
    assert small.estimated_gb <= large.estimated_gb + 0.01
    if large.fits:
        assert small.fits


@settings(max_examples=300, deadline=None)
@given(params=_requests, more_gib=st.sampled_from([1.5, 2.0]), more_util=st.floats(0, 0.3))
def test_more_gpu_memory_never_needs_more_gpus(params, more_gib, more_util):
    roomier = {**params, "gpu_memory_gib": params["gpu_memory_gib"] * more_gib,
               "utilization": min(0.98, params["utilization"] + more_util)}
    assert _gpus(_size(roomier)) <= _gpus(_size(params))


@settings(max_examples=400, deadline=None)
@given(params=_requests)
def test_never_below_the_table_and_the_smallest_power_of_two_that_holds_every_sequence(params):
    result = _size(params)
    assert result.table_gb == estimate_gb(params["role"], "instruct", params["video_seconds"]).gigabytes
    graphs = TALKER_GRAPHS_GB if params["role"] == "talker" else 0.0
    assert result.graphs_gb == graphs and result.estimated_gb >= result.table_gb + graphs
    if params["max_num_seqs"] == 1:
        assert result.estimated_gb == round(result.table_gb + graphs, 2)
    if not result.fits:
        assert result.vllm_args == [] and result.gpus_per_replica == 0
        return
    usable = result.usable_gb_per_gpu
    L, H, D, B = params["layers"], params["kv_heads"], params["head_dim"], params["dtype_bytes"]
    kv_tokens = (params["max_num_seqs"] - 1) * result.context_tokens
    per_node = 2 ** int(math.log2(params["gpus_per_node"]))

    def gb_per_gpu(g: int) -> float:  # the table's share plus the KV each GPU keeps (at least a whole head)
        if params["role"] == "talker":  # one GPU, with the CUDA graphs besides
            tp = pp = 1
        else:
            pp = max(1, g // per_node)
            tp = g // pp
        per_token = 2 * math.ceil(L / pp) * max(1, math.ceil(H / tp)) * D * B
        if params["role"] == "combined":  # thinker and talker share the shape here
            per_token *= 2
        return result.table_gb / g + graphs + kv_tokens * per_token / 1e9

    g = result.gpus_per_replica
    assert g & (g - 1) == 0, "power of two"
    assert gb_per_gpu(g) <= usable + 1e-6
    assert g == 1 or gb_per_gpu(g // 2) > usable
    assert result.pods_per_replica * result.gpus_per_pod == g
    assert result.gpus_per_pod <= params["gpus_per_node"]
    assert result.pods_per_replica <= params["max_nodes_per_replica"]
    if params["role"] != "talker":
        args = dict(zip(result.vllm_args[::2], result.vllm_args[1::2]))
        assert args["--max-num-seqs"] == str(params["max_num_seqs"])
        assert args["--max-model-len"] == str(result.context_tokens)
        assert int(args["--kv-cache-memory-bytes"]) == result.kv_cache_bytes_per_gpu > 0


@settings(max_examples=300, deadline=None)
@given(params=_requests)
def test_a_refusal_names_the_largest_concurrency_that_fits(params):
    too_many = {**params, "max_num_seqs": 4096}
    result = _size(too_many)
    if result.fits or "the model's context" in result.reason or result.sequences_that_fit == 0:
        return  # nothing to name: the context is too long, or not even one request fits
    n = result.sequences_that_fit
    assert f"fits {n} concurrent sequence" in result.reason and "asked for 4096" in result.reason
    assert _size({**params, "max_num_seqs": n}).fits
    assert not _size({**params, "max_num_seqs": n + 1}).fits


def test_context_refusal_still_names_the_tokens_with_concurrency():
    result = size(SizingRequest(role="talker", variant="instruct", video_seconds=240, gpu_memory_gib=141))
    assert not result.fits and "65536" in result.reason


def test_concurrency_below_one_is_refused():
    with pytest.raises(ValueError, match="concurrent sequences"):
        size(SizingRequest(role="thinker", variant="thinking", video_seconds=15, gpu_memory_gib=80, max_num_seqs=0))

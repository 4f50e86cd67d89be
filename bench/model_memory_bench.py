"""What one request of the full-size Qwen3-Omni-30B-A3B costs on a GPU, against the operator's sizing.

The published architecture (thinker: 48 layers of 128 experts, 32 query and 4 KV heads of 128;
vision and audio towers; talker: 20 layers of 128 experts; code predictor; code2wav) is built on
the GPU with random bf16 weights, in transformers with PyTorch SDPA attention. Nothing is
downloaded: memory does not depend on the weights' values.

Per video length, the request the model card's table describes: a video at 2 fps and 512x512
(256 tokens per second after the vision tower), its audio track through the audio tower, and a
short prompt; the thinker prefills it and decodes a few tokens (transformers `generate`). Printed:

  - weights per part, measured (allocated after building) and counted (parameter bytes);
  - the thinker's peak allocated memory for that request, against the table's row the operator
    sizes a thinker pod from (`estimate_gb("thinker", "thinking", s)`);
  - its KV cache per token (the cache's tensors / tokens), against the sizing's
    2 x layers x KV heads x head dim x dtype bytes;
  - the talker's peak for a prefill over the same context plus code2wav of the answer's audio,
    against the talker row (Instruct - Thinking);

    python -m bench.model_memory_bench [--seconds 15 30 60 120] [--scale full|tiny] [--device cuda]

`--scale tiny` runs the same steps with the tiny test model's dimensions (on CPU too): a
rehearsal of the code path, whose figures mean nothing. The last line is the thinker's measured
peak divided by the table's figure for the longest video.
"""

from __future__ import annotations

import argparse
import time

GB = 1e9

# Qwen3-Omni-30B-A3B's dimensions (its config.json), section by section as
# omni_runtime.tiny.build_config names them. Token ids stay the tiny layout's: any id
# below the vocabulary size costs the same memory.
FULL_SIZE = {
    "thinker_text": dict(vocab_size=152064, hidden_size=2048, intermediate_size=768, num_hidden_layers=48,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                         num_experts=128, num_experts_per_tok=8, max_position_embeddings=65536,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [24, 20, 20], "interleaved": True,
                                          "mrope_interleaved": True}),
    "audio": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                  output_dim=2048, downsample_hidden_size=480),
    "vision": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                   num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24], image_size=768),
    "talker_text": dict(vocab_size=3072, hidden_size=1024, intermediate_size=2048, num_hidden_layers=20,
                        num_attention_heads=16, num_key_value_heads=2, head_dim=128, moe_intermediate_size=384,
                        shared_expert_intermediate_size=768, num_experts=128, num_experts_per_tok=6,
                        max_position_embeddings=65536,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [24, 20, 20], "interleaved": True}),
    "predictor": dict(vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=5,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_code_groups=16,
                      max_position_embeddings=32768),
    "talker": dict(num_code_groups=16, thinker_hidden_size=2048, accept_hidden_layer=24),
    "code2wav": dict(codebook_size=2048, hidden_size=1024, num_attention_heads=16, num_key_value_heads=16,
                     intermediate_size=3072, num_hidden_layers=8, num_quantizers=16, decoder_dim=1536,
                     sliding_window=72, max_position_embeddings=8000),
}

VIDEO_FPS = 2
VIDEO_PATCHES = 32  # 512 px / 16 px patches, each way: 32 x 32 / (2 x 2 merge) = 256 tokens per 2 frames
MEL_FRAMES_PER_SECOND = 100
CODES_PER_SECOND = 12.5
ANSWER_SECONDS = 15  # spoken answer the talker's code2wav renders
DECODE_TOKENS = 16


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes, tokens) of a transformers KV cache."""
    from omni_runtime.talker.engine import kv_layers

    total, tokens = 0, 0
    for keys, values in kv_layers(cache):
        for t in (keys, values):
            if t is not None and t.numel():
                total += t.numel() * t.element_size()
                tokens = max(tokens, t.shape[-2])
    return total, tokens


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class Meter:
    """Allocated-memory readings (torch's allocator) on a CUDA device; zeros elsewhere."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def now(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else 0

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> tuple[int, int]:
        if not self.cuda:
            return 0, 0
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated(), self.torch.cuda.max_memory_reserved()


def video_request(config, seconds: float, device, dtype, torch):
    """Thinker inputs for one request: `seconds` of video and its audio track, and a prompt."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

    thinker = config.thinker_config
    vision = thinker.vision_config
    frames = max(2, int(round(seconds * VIDEO_FPS)))
    grid = torch.tensor([[frames // vision.temporal_patch_size, VIDEO_PATCHES, VIDEO_PATCHES]], device=device)
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(int(grid.prod()), patch, device=device, dtype=dtype)
    video_tokens = int(grid.prod()) // vision.spatial_merge_size ** 2
    mel = int(seconds * MEL_FRAMES_PER_SECOND)
    features = torch.randn(1, thinker.audio_config.num_mel_bins, mel, device=device, dtype=dtype)
    audio_tokens = int(m._get_feat_extract_output_lengths(torch.tensor(mel)))

    from omni_runtime.tiny import token_ids

    ids = token_ids()
    prompt = [ids["<|im_start|>"], ids["user"], 10]
    prompt += [ids["<|vision_start|>"]] + [ids["<|video_pad|>"]] * video_tokens + [ids["<|vision_end|>"]]
    prompt += [ids["<|audio_start|>"]] + [ids["<|audio_pad|>"]] * audio_tokens + [ids["<|audio_end|>"]]
    prompt += list(range(40, 104)) + [ids["<|im_end|>"], 10, ids["<|im_start|>"], ids["assistant"], 10]
    input_ids = torch.tensor([prompt], device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values_videos": pixels, "video_grid_thw": grid,
            "video_second_per_grid": torch.tensor([vision.temporal_patch_size / VIDEO_FPS], device=device),
            "input_features": features,
            "feature_attention_mask": torch.ones(1, mel, dtype=torch.long, device=device)}


def thinker_request(model, config, seconds, meter, device, dtype, torch) -> dict:
    inputs = video_request(config, seconds, device, dtype, torch)
    meter.reset()
    t0 = time.monotonic()
    with torch.no_grad():
        out = model.thinker.generate(**inputs, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                                     do_sample=False, return_dict_in_generate=True)
    elapsed = time.monotonic() - t0
    peak, reserved = meter.peak()
    kv, tokens = cache_bytes(out.past_key_values)
    return {"context": int(inputs["input_ids"].shape[1]), "peak": peak, "reserved": reserved, "kv": kv,
            "kv_tokens": tokens, "seconds": elapsed}


def talker_request(model, config, context: int, meter, device, dtype, torch) -> dict:
    """The talker's prefill over the request's context, then code2wav of the spoken answer."""
    talker = config.talker_config
    embeds = torch.randn(1, context, talker.text_config.hidden_size, device=device, dtype=dtype)
    codes = torch.randint(0, config.code2wav_config.codebook_size,
                          (1, talker.num_code_groups, int(ANSWER_SECONDS * CODES_PER_SECOND)), device=device)
    meter.reset()
    with torch.no_grad():
        out = model.talker.model(inputs_embeds=embeds, use_cache=True)
        kv, tokens = cache_bytes(out.past_key_values)
        model.code2wav.chunked_decode(codes)
    peak, reserved = meter.peak()
    return {"peak": peak, "reserved": reserved, "kv": kv, "kv_tokens": tokens}


def run(args: argparse.Namespace) -> list[dict]:
    """Print the figures; returns one row per video length."""
    import torch
    import transformers
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_operator.sizing.kv_cache import architecture_from_config
    from omni_operator.sizing.model_card import estimate_gb
    from omni_runtime.tiny import build_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meter = Meter(torch, device)
    config = build_config(FULL_SIZE if args.scale == "full" else None)
    # The sizing's KV cache per token, read from this config as the operator reads a checkpoint's.
    arch = architecture_from_config({**config.to_dict(), "dtype": str(dtype).removeprefix("torch.")})
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# Qwen3-Omni-30B-A3B architecture ({args.scale}), random {str(dtype).removeprefix('torch.')} weights, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {name}, SDPA attention")

    torch.manual_seed(0)
    meter.reset()
    t0 = time.monotonic()
    with torch.device(device):
        model = Qwen3OmniMoeForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    built = meter.now()
    parts = {"thinker": param_bytes(model.thinker), "talker": param_bytes(model.talker),
             "code2wav": param_bytes(model.code2wav)}
    print(f"built in {time.monotonic() - t0:.1f} s: {built / GB:.2f} GB allocated; parameters: "
          + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in parts.items()))

    rows = []
    for seconds in args.seconds:
        think = thinker_request(model, config, seconds, meter, device, dtype, torch)
        # What a thinker pod holds: the thinker's weights, not the talker's (built in the same process here).
        thinker_peak = think["peak"] - parts["talker"] - parts["code2wav"]
        talk = talker_request(model, config, think["context"], meter, device, dtype, torch)
        talker_peak = talk["peak"] - parts["thinker"]
        rows.append({"seconds": seconds, "context": think["context"], "thinker_peak": thinker_peak,
                     "talker_peak": talker_peak, "thinker_kv_per_token": think["kv"] / think["kv_tokens"],
                     "talker_kv_per_token": talk["kv"] / talk["kv_tokens"],
                     "sizing_thinker_kv_per_token": arch.thinker.bytes_per_token,
                     "sizing_talker_kv_per_token": arch.talker.bytes_per_token})
        table_thinker = estimate_gb("thinker", "thinking", seconds).gigabytes
        table_talker = estimate_gb("talker", "instruct", seconds).gigabytes
        print(f"{seconds:g} s video: context {think['context']} tokens, thinker generate {think['seconds']:.1f} s")
        print(f"  thinker: peak {thinker_peak / GB:.2f} GB (table {table_thinker:.2f} GB, "
              f"{thinker_peak / GB / table_thinker:.2f}x); KV cache {think['kv'] / think['kv_tokens'] / 1024:.1f} "
              f"KiB per token (sizing {arch.thinker.bytes_per_token / 1024:.1f})")
        print(f"  talker:  peak {talker_peak / GB:.2f} GB (table {table_talker:.2f} GB, "
              f"{talker_peak / GB / table_talker:.2f}x); KV cache {talk['kv'] / talk['kv_tokens'] / 1024:.1f} "
              f"KiB per token (sizing {arch.talker.bytes_per_token / 1024:.1f})")
    last = rows[-1]
    table = estimate_gb("thinker", "thinking", last["seconds"]).gigabytes
    print(f"ratio measured/table thinker peak at {last['seconds']:g} s: {last['thinker_peak'] / GB / table:.3f}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, nargs="+", default=[15, 30, 60, 120])
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

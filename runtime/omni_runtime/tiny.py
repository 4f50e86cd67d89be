"""A tiny random-weight Qwen3-Omni checkpoint for CPU tests and local development.

Everything is built locally (config, weights, tokenizer, feature extractor, image
processor config): nothing is downloaded. The layout matches a real checkpoint
directory, so transformers (thinker, talker) and vLLM (thinker) load it through the
same code paths as `Qwen/Qwen3-Omni-30B-A3B-Instruct`.

What vLLM needs beyond what transformers accepts: a thinker head_dim >= 32 (vLLM's CPU
attention kernel refuses smaller heads; mrope_section then sums to head_dim / 2), the
image processor fields in preprocessor_config.json, the multimodal special tokens named
in tokenizer_config.json, the vision `image_size`/`apply_vit_abs_pos_embed`, an explicit
`tie_word_embeddings`, and `mrope_interleaved`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Token layout of the tiny tokenizer: 256 byte tokens, then specials, then the
# three role words as single tokens (the real vocabulary also has them as one token).
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|tts_pad|>",
    "<|tts_bos|>",
    "<|tts_eos|>",
]
ROLE_TOKENS = ["system", "user", "assistant"]
TEXT_VOCAB = 320  # 256 bytes + 13 specials + 3 roles, rounded up

# Talker codec vocabulary: transformers suppresses the last 1024 ids (except EOS)
# while sampling, so the codec vocabulary must be larger than that.
CODEBOOK = 128
TALKER_VOCAB = CODEBOOK + 1024
CODEC_PAD, CODEC_BOS, CODEC_EOS = TALKER_VOCAB - 10, TALKER_VOCAB - 9, TALKER_VOCAB - 8
CODEC_NOTHINK, CODEC_THINK_BOS, CODEC_THINK_EOS = TALKER_VOCAB - 7, TALKER_VOCAB - 6, TALKER_VOCAB - 5
SPEAKERS = {"ethan": TALKER_VOCAB - 4, "chelsie": TALKER_VOCAB - 3, "aiden": TALKER_VOCAB - 2}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    "{%- elif part['type'] in ('audio', 'input_audio') %}{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif part['type'] in ('image', 'image_url') %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] in ('video', 'video_url') %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def token_ids() -> dict[str, int]:
    ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i, tok in enumerate(ROLE_TOKENS):
        ids[tok] = 256 + len(SPECIAL_TOKENS) + i
    return ids


def build_config(sizes: dict[str, dict] | None = None):
    """The tiny model's config. `sizes` replaces fields per section (thinker_text, audio, vision,
    talker_text, predictor, talker, code2wav), keeping the tiny token layout: the full-size
    architecture of bench.model_memory_bench is built this way."""
    from transformers import Qwen3OmniMoeConfig

    ids = token_ids()
    thinker_text = dict(
        vocab_size=TEXT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
        # transformers always interleaves the M-RoPE sections for this model; vLLM does so only
        # when `mrope_interleaved` says so (the real checkpoint sets both keys).
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [8, 4, 4], "interleaved": True, "mrope_interleaved": True},
    )
    audio = dict(
        num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
        d_model=16, output_dim=32, downsample_hidden_size=8, max_source_positions=1500,
        n_window=50, n_window_infer=800, conv_chunksize=500,
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
        deepstack_visual_indexes=[0],
        image_size=8 * 16,  # sqrt(num_position_embeddings) * patch_size
        apply_vit_abs_pos_embed=True,
    )
    thinker = dict(
        text_config=thinker_text, audio_config=audio, vision_config=vision,
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], audio_start_token_id=ids["<|audio_start|>"],
        user_token_id=ids["user"], position_id_per_seconds=25,
        vision_start_token_id=ids["<|vision_start|>"],
    )
    talker_text = dict(
        vocab_size=TALKER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [2, 1, 1], "interleaved": True},
    )
    predictor = dict(
        vocab_size=CODEBOOK, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_code_groups=4,
        max_position_embeddings=64,
    )
    talker = dict(
        text_config=talker_text, code_predictor_config=predictor, num_code_groups=4,
        # Like the real checkpoint (24 of 48, deepstack after layers 0-2), the accepted layer
        # comes after the deepstack layer (0 here) and before the last one.
        thinker_hidden_size=32, accept_hidden_layer=2,
        codec_eos_token_id=CODEC_EOS, codec_nothink_id=CODEC_NOTHINK,
        codec_think_bos_id=CODEC_THINK_BOS, codec_think_eos_id=CODEC_THINK_EOS,
        codec_pad_id=CODEC_PAD, codec_bos_id=CODEC_BOS,
        audio_token_id=ids["<|audio_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        audio_start_token_id=ids["<|audio_start|>"], speaker_id=dict(SPEAKERS),
        spatial_merge_size=2,
    )
    code2wav = dict(
        codebook_size=CODEBOOK, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, num_hidden_layers=1, num_quantizers=4, decoder_dim=32,
        upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], sliding_window=8,
        max_position_embeddings=2048,
    )
    sections = {"thinker_text": thinker_text, "audio": audio, "vision": vision, "talker_text": talker_text,
                "predictor": predictor, "talker": talker, "code2wav": code2wav}
    for section, values in (sizes or {}).items():
        sections[section].update(values)
    return Qwen3OmniMoeConfig(
        thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
        im_start_token_id=ids["<|im_start|>"], im_end_token_id=ids["<|im_end|>"],
        tts_pad_token_id=ids["<|tts_pad|>"], tts_bos_token_id=ids["<|tts_bos|>"],
        tts_eos_token_id=ids["<|tts_eos|>"], system_token_id=ids["system"],
        user_token_id=ids["user"], assistant_token_id=ids["assistant"],
    )


def _byte_alphabet() -> dict[int, str]:
    """The printable stand-in character ByteLevel pre-tokenization uses for each byte."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    mapping = _byte_alphabet()
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    for b in range(256):
        vocab[mapping[b]] = b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ROLE_TOKENS])
    ids = token_ids()
    for t, i in ids.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE, extra_special_tokens=dict(MM_SPECIAL_TOKENS),
    )
    return fast


# The attribute names Qwen3OmniMoeProcessor reads from the tokenizer.
MM_SPECIAL_TOKENS = {
    "image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
}

# Qwen2-VL image processor settings matching the tiny vision tower (patch 16, merge 2);
# real checkpoints keep them in the same preprocessor_config.json as the audio features.
IMAGE_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3OmniMoeProcessor",
    "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
    "min_pixels": 32 * 32, "max_pixels": 256 * 256,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
    "rescale_factor": 1 / 255, "resample": 3,
}


def build_feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)


def draw_skipped_weights(model, torch, std: float) -> None:
    """transformers' weight init (5.24) skips the talker's MoE router and experts: they keep
    whatever memory `torch.empty` returned, zeros on one machine and NaN on another. Draw them
    like the other weights, from the same seeded generator."""
    with torch.no_grad():
        for name, p in model.talker.named_parameters():
            if ".mlp.experts." in name or name.endswith(".mlp.gate.weight"):
                p.normal_(0.0, std)


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen3-Omni checkpoint to `out_dir` and return it."""
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = build_config()
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    draw_skipped_weights(model, torch, config.talker_config.initializer_range)
    # Random weights leave the waveform near 1e-6; rescale the last convolution so the
    # tiny model's speech is audible PCM (tests check the audio is not silence).
    with torch.no_grad():
        codes = torch.randint(0, CODEBOOK, (1, config.code2wav_config.num_quantizers, 8))
        std = float(model.code2wav(codes).std()) or 1e-6
        last = model.code2wav.decoder[-1].conv
        last.weight.mul_(0.2 / std)
        if last.bias is not None:
            last.bias.zero_()
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    # Newer transformers write the named tokens as top-level keys; the release vLLM pins
    # reads them from `extra_special_tokens`. Both are kept.
    tcfg = out / "tokenizer_config.json"
    tcfg.write_text(json.dumps({**json.loads(tcfg.read_text()), "extra_special_tokens": dict(MM_SPECIAL_TOKENS)},
                               indent=2))
    build_feature_extractor().save_pretrained(out)
    pre = out / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), **IMAGE_PROCESSOR}, indent=2))
    (out / "omni_tiny.json").write_text(json.dumps({"tiny": True, "seed": seed}))
    return out

"""Reference thinker states from transformers, for the vLLM export equality test.

Run as a script with a JSON request on stdin:
  {"model": DIR, "prompt_ids": [...], "audio_wav_b64": "..." | null, "image_b64": "..." | null}
prints {"layer", "positions", "shape", "data" (base64 float32 LE), "audio_feature_lengths", "image_grid_thw"}.

It runs in .venv-vllm (transformers as pinned by vLLM, with the image processor's PIL and
torchvision) so the media are turned into features by the same processor classes vLLM uses;
the token ids are vLLM's own `prompt_token_ids`, so both sides see the same sequence.
"""

from __future__ import annotations

import base64
import io
import json
import sys


def reference(req: dict) -> dict:
    import numpy as np
    import torch
    from transformers import AutoProcessor, Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(req["model"], dtype=torch.float32,
                                                                 enable_audio_output=False).eval()
    processor = AutoProcessor.from_pretrained(req["model"])
    tc = model.config.thinker_config
    layer = model.config.talker_config.accept_hidden_layer
    ids = torch.tensor([req["prompt_ids"]])
    kwargs: dict = {}
    meta: dict = {}
    if req.get("audio_wav_b64"):
        import wave

        with wave.open(io.BytesIO(base64.b64decode(req["audio_wav_b64"]))) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
        fe = processor.feature_extractor
        assert rate == fe.sampling_rate, "the test sends audio at the extractor's rate (no resampling on either side)"
        feats = fe([pcm], sampling_rate=rate, return_attention_mask=True, padding="longest", return_tensors="pt")
        kwargs.update(input_features=feats["input_features"], feature_attention_mask=feats["attention_mask"])
        meta["audio_feature_lengths"] = [int(x) for x in feats["attention_mask"].sum(-1).tolist()]
    if req.get("image_b64"):
        from PIL import Image

        img = Image.open(io.BytesIO(base64.b64decode(req["image_b64"]))).convert("RGB")
        out = processor.image_processor(images=[img], return_tensors="pt")
        kwargs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
        meta["image_grid_thw"] = out["image_grid_thw"].tolist()
    mm_ids = {tc.audio_token_id, tc.image_token_id, tc.video_token_id}
    positions = [i for i, t in enumerate(req["prompt_ids"]) if t in mm_ids]
    with torch.inference_mode():
        fwd = model.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **kwargs)
    states = fwd.hidden_states[layer][0, positions].to(torch.float32).contiguous()
    return {"layer": layer, "positions": positions, "shape": list(states.shape),
            "data": base64.b64encode(states.numpy().astype("<f4").tobytes()).decode(), **meta}


if __name__ == "__main__":
    json.dump(reference(json.load(sys.stdin)), sys.stdout)

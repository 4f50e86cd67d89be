"""`omni-runtime thinker --engine transformers`: an OpenAI-compatible server around the
transformers Qwen3-Omni thinker, for CPU tests and development (production uses vLLM).

Inputs: text, `input_audio` (wav) and `audio_url` data: URLs of WAV audio. `image_url`,
`video_url` and http(s) audio URLs are answered with a 400 that says so (vLLM takes them).

Beyond the OpenAI surface it speaks what the gateway uses for speech:
  * `"return_token_ids": true` -> `prompt_token_ids` and `choices[i].token_ids`
    (the same fields vLLM returns for this flag);
  * vLLM's sampling extensions `ignore_eos` (do not stop at EOS) and `min_tokens` (no EOS
    before that many tokens), with vLLM's checks;
  * header `X-Request-Id: <rid>` -> the response id is `chatcmpl-<rid>` (as in vLLM) and,
    when the prompt has multimodal tokens, the thinker's layer-`accept_hidden_layer`
    states at those positions are published before generation starts, on the metrics
    port: `GET /v1/omni/mm-states/<rid>` answers payload v1's `mm` object once, then 404;
    unfetched states expire after OMNI_MM_STATES_TTL_SECONDS, oldest first beyond
    OMNI_MM_STATES_MAX_BYTES (OMNI_MM_STATES_EXPORT=0 turns publishing off). Store,
    settings and endpoint are the vLLM launcher's (mm_store.py, launcher.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from omni_runtime.config import ThinkerSettings
from omni_runtime.media import WAV_TYPES, MediaError, b64decode, decode_data_url, url_of
from omni_runtime.metrics import ThinkerMetrics, metrics_app
from omni_runtime.server import EngineService, json_error, serve
from omni_runtime.thinker import mm_store
from omni_runtime.thinker.mm_capture import RID
from omni_runtime.thinker.vllm_launcher import mm_states_routes, mm_states_store

log = logging.getLogger("omni.thinker")


class BadRequest(ValueError):
    pass


def feat_output_length(n_frames: int, n_window: int = 50) -> int:
    """Audio tokens the AuT encoder produces for n mel frames (Qwen3-Omni's formula)."""
    chunk = n_window * 2
    rem = n_frames % chunk
    feat = (rem - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (n_frames // chunk) * 13


def wav_of_part(part: dict, kind: str) -> bytes:
    """The WAV bytes of an `input_audio` (format wav) or `audio_url` (data:audio/wav URL) part."""
    if kind == "input_audio":
        spec = part.get("input_audio") or {}
        if spec.get("format", "wav") != "wav":
            raise MediaError("this engine reads wav audio only")
        return b64decode(spec.get("data"))
    url = url_of(part, kind)
    if url[:5].lower() != "data:":
        raise MediaError("the transformers engine fetches no URLs; send data:audio/wav;base64,<data> "
                         "(http(s) audio URLs need the vLLM engine)")
    media_type, (raw,) = decode_data_url(url, "audio")
    if media_type not in WAV_TYPES:
        raise MediaError(f"this engine reads WAV audio only (data:audio/wav;base64,...), not {media_type}")
    return raw


class ThinkerEngine:
    def __init__(self, model: str, revision: str | None = None, device: str = "cpu", dtype: str | None = None):
        import torch
        from transformers import AutoFeatureExtractor, AutoTokenizer, Qwen3OmniMoeForConditionalGeneration

        from omni_runtime.checkpoint import resolve_model_dir

        self.torch = torch
        model_dir = resolve_model_dir(model, revision)
        self.device = torch.device(device)
        dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model_dir, enable_audio_output=False, dtype=dt)
        self.model = full.thinker.to(self.device).eval()
        self.config = full.config
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        try:
            self.features = AutoFeatureExtractor.from_pretrained(model_dir)
        except Exception:  # noqa: BLE001 - text-only checkpoints
            self.features = None
        tc = self.config.thinker_config
        self.audio_token_id = tc.audio_token_id
        self.mm_ids = {tc.audio_token_id, tc.image_token_id, tc.video_token_id}
        self.accept_layer = self.config.talker_config.accept_hidden_layer
        self.n_window = getattr(tc.audio_config, "n_window", 50)
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.lock = threading.Lock()

    # -- request -> model inputs -----------------------------------------------------
    def prepare(self, messages: list) -> dict:
        from omni_runtime.audio import decode_wav, resample_linear

        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        hf_messages, audios = [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
                raise BadRequest(f"messages[{i}] needs a role of system, user or assistant")
            content = msg.get("content")
            if isinstance(content, str):
                hf_messages.append({"role": msg["role"], "content": content})
                continue
            if not isinstance(content, list):
                raise BadRequest(f"messages[{i}].content must be a string or a list of parts")
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                where = f"messages[{i}].content[{j}]"
                if kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                elif kind in ("input_audio", "audio_url"):
                    try:
                        wav, rate = decode_wav(wav_of_part(part, kind))
                    except (MediaError, ValueError) as exc:
                        raise BadRequest(f"{where}: {kind}: {exc}") from None
                    if self.features is None:
                        raise BadRequest("this checkpoint has no audio feature extractor")
                    audios.append(resample_linear(wav, rate, self.features.sampling_rate))
                    parts.append({"type": "audio"})
                elif kind in ("image_url", "video_url"):
                    raise BadRequest(f"{where}: {kind} input is not supported by the transformers engine (the vLLM "
                                     "engine takes it); this engine reads text, input_audio and audio_url (WAV)")
                else:
                    raise BadRequest(f"{where}: unknown content part type {kind!r}")
            hf_messages.append({"role": msg["role"], "content": parts})
        ids = self.tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        inputs = {}
        audio_lengths = []
        if audios:
            feats = self.features(audios, sampling_rate=self.features.sampling_rate, return_attention_mask=True,
                                  padding="longest", return_tensors="pt")
            mask = feats["attention_mask"]
            frames = mask.sum(-1).tolist()
            audio_lengths = [int(f) for f in frames]
            counts = [feat_output_length(int(f), self.n_window) for f in frames]
            expanded, k = [], 0
            for t in ids:
                if t == self.audio_token_id:
                    if k >= len(counts):
                        raise BadRequest("more audio placeholders than audio inputs")
                    expanded += [t] * counts[k]
                    k += 1
                else:
                    expanded.append(t)
            ids = expanded
            inputs = {"input_features": feats["input_features"].to(self.device, self.model.dtype),
                      "feature_attention_mask": mask.to(self.device)}
        return {"ids": ids, "inputs": inputs, "audio_feature_lengths": audio_lengths}

    # -- generation (runs on a worker thread) -----------------------------------------
    def mm_states(self, prep: dict, ids) -> tuple[dict, bytes] | None:
        """(header, raw rows) of payload v1's `mm` for the prompt: its layer
        `accept_hidden_layer` states at the multimodal positions, in prompt order; None
        for a prompt without multimodal tokens."""
        positions = [i for i, t in enumerate(prep["ids"]) if t in self.mm_ids]
        if not positions:
            return None
        from omni_runtime.payload import states_bytes

        torch = self.torch
        fwd = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                         **prep["inputs"])
        states = fwd.hidden_states[self.accept_layer][0, positions]
        dtype = "bfloat16" if self.model.dtype == torch.bfloat16 else "float32"
        header = {"layer": self.accept_layer, "dtype": dtype, "shape": list(states.shape)}
        if prep["audio_feature_lengths"]:
            header["audio_feature_lengths"] = prep["audio_feature_lengths"]
        return header, states_bytes(states, dtype)

    def generate(self, prep: dict, params: dict, on_tokens, want_states: bool, on_states=None,
                 stop: threading.Event | None = None) -> dict:
        """Generate, streaming token ids to `on_tokens`. With `on_states` (or `want_states`)
        the multimodal states are computed first (a prefill of their own, so they are out
        before the answer) and handed to `on_states(header, raw)` (or returned as
        `mm_states`, the inline `mm` object). Setting `stop` ends generation after the
        current step (the client went away)."""
        torch = self.torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop is not None and stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        class Streamer(BaseStreamer):
            def __init__(self):
                self.first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                    return
                on_tokens([int(x) for x in value.reshape(-1).tolist()])

            def end(self):
                pass

        ids = torch.tensor([prep["ids"]], device=self.device)
        # ignore_eos: no stop token at all (the answer runs to max_tokens, EOS may appear in it);
        # min_tokens: EOS is masked until that many tokens are out
        gen = dict(max_new_tokens=params["max_tokens"], pad_token_id=self.eos,
                   eos_token_id=None if params.get("ignore_eos") else self.eos,
                   stopping_criteria=StoppingCriteriaList([Stopped()]))
        if params.get("min_tokens") and not params.get("ignore_eos"):
            gen["min_new_tokens"] = params["min_tokens"]
        if params["temperature"] > 0:
            gen.update(do_sample=True, temperature=params["temperature"], top_p=params["top_p"])
        else:
            gen.update(do_sample=False)
        result = {}
        with self.lock, torch.inference_mode():
            if want_states or on_states is not None:
                mm = self.mm_states(prep, ids)
                if mm is not None:
                    if on_states is not None:
                        on_states(*mm)
                    if want_states:
                        result["mm_states"] = {**mm[0], "data": base64.b64encode(mm[1]).decode("ascii")}
            if params.get("seed") is not None:
                torch.manual_seed(params["seed"])
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=Streamer(),
                                      **prep["inputs"], **gen)
            result["token_ids"] = out[0, ids.shape[1]:].tolist()
        return result


def _params(body: dict) -> dict:
    def num(name, default, lo, hi, typ=float):
        v = body.get(name, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadRequest(f"{name} must be a number")
        if not lo <= v <= hi:
            raise BadRequest(f"{name} must be between {lo} and {hi}")
        return typ(v)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = {
        "max_tokens": num("max_tokens", 64, 1, 8192, int) if max_tokens is None else
        num("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens", 64, 1, 8192, int),
        "temperature": num("temperature", 0.0, 0.0, 2.0),
        "top_p": num("top_p", 1.0, 0.0, 1.0),
        "seed": body.get("seed") if isinstance(body.get("seed"), int) else None,
    }
    # vLLM's sampling extensions, same names and checks (benchmarks ask for long answers)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos must be a boolean")
    min_tokens = body.get("min_tokens", 0)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int):
        raise BadRequest("min_tokens must be an integer")
    if min_tokens < 0:
        raise BadRequest(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if min_tokens > params["max_tokens"]:
        raise BadRequest(f"min_tokens must be less than or equal to max_tokens={params['max_tokens']}, "
                         f"got {min_tokens}.")
    params.update(ignore_eos=ignore_eos, min_tokens=min_tokens)
    return params


class ThinkerService(EngineService):
    role = "thinker"

    def __init__(self, cfg: ThinkerSettings):
        super().__init__(cfg, ThinkerMetrics())
        self.engine: ThinkerEngine | None = None
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="thinker")
        self.name = cfg.served_model_name or cfg.model
        # the same OMNI_MM_STATES_* settings as the vLLM launcher
        self.states_store, self.owns_states_dir = mm_states_store(cfg.mm_states)

    def make_engine(self) -> ThinkerEngine:
        return ThinkerEngine(self.cfg.model, self.cfg.revision, self.cfg.device, self.cfg.dtype)

    async def models(self, _request):
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "omni-runtime"}]})

    async def tokenize(self, request):
        if self.engine is None:
            return json_error(503, "model is loading", "unavailable")
        body = await request.json()
        try:
            if "messages" in body:
                ids = self.engine.prepare(body["messages"])["ids"]
            else:
                ids = self.engine.tokenizer(str(body.get("prompt", "")), add_special_tokens=False)["input_ids"]
        except BadRequest as exc:
            return json_error(400, str(exc))
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 4096})

    async def chat(self, request: web.Request):
        if self.draining:
            self.metrics.count(503)  # the gateway takes it as "try another replica"
            return json_error(503, "thinker is draining", "unavailable", headers={"Retry-After": "1"})
        if self.engine is None:
            return json_error(503, "model is loading", "unavailable")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return json_error(400, "body is not JSON")
        try:
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object")
            params = _params(body)
            prep = self.engine.prepare(body.get("messages"))
        except BadRequest as exc:
            return json_error(400, str(exc))
        external = request.headers.get("X-Request-Id")
        if external is not None and not RID.match(external):
            return json_error(400, "X-Request-Id must match [A-Za-z0-9-]{1,64} (it names the request's "
                                   "multimodal states)")
        stream = bool(body.get("stream"))
        want_ids = bool(body.get("return_token_ids"))
        rid = f"chatcmpl-{external or uuid.uuid4().hex[:24]}"
        publish = None
        if external is not None and self.cfg.mm_states.export:
            def publish(header: dict, raw: bytes):  # on the worker thread, before generation starts
                mm_store.write_atomic(self.states_store.dir, external, mm_store.encode_file(header, raw))
        created = int(time.time())
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.waiting += 1
        self._update()
        started = {"flag": False}
        stop = threading.Event()  # set when this handler ends: a client that left stops the generation

        def on_tokens(tokens):
            loop.call_soon_threadsafe(q.put_nowait, ("tokens", tokens))

        def work():
            loop.call_soon_threadsafe(q.put_nowait, ("start", None))
            try:
                res = self.engine.generate(prep, params, on_tokens, False, publish, stop)
                loop.call_soon_threadsafe(q.put_nowait, ("done", res))
            except BaseException as exc:  # noqa: BLE001
                loop.call_soon_threadsafe(q.put_nowait, ("error", exc))

        fut = loop.run_in_executor(self.pool, work)
        tok = self.engine.tokenizer
        generated: list[int] = []
        text_sent = ""
        resp = None

        def chunk(delta: dict, finish=None, extra=None):
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if extra:
                for k, v in extra.items():
                    if k == "token_ids":
                        obj["choices"][0]["token_ids"] = v
                    else:
                        obj[k] = v
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        try:
            while True:
                kind, item = await q.get()
                if kind == "start":
                    self.waiting -= 1
                    self.running += 1
                    started["flag"] = True
                    self._update()
                    if stream:
                        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                        await resp.prepare(request)
                        extra = {"prompt_token_ids": prep["ids"]} if want_ids else None
                        await resp.write(chunk({"role": "assistant", "content": ""}, extra=extra))
                elif kind == "tokens":
                    generated += item
                    visible = [t for t in generated if t != self.engine.eos]
                    text = tok.decode(visible, skip_special_tokens=True)
                    delta, text_sent = text[len(text_sent):], text
                    if stream:
                        await resp.write(chunk({"content": delta}, extra={"token_ids": item} if want_ids else None))
                elif kind == "error":
                    log.error("generation failed: %r", item)
                    if resp is None:
                        return json_error(500, f"generation failed: {item}", "server_error")
                    break
                elif kind == "done":
                    ids = item["token_ids"]
                    stopped = ids and ids[-1] == self.engine.eos and not params["ignore_eos"]
                    finish = "stop" if stopped else "length"
                    usage = {"prompt_tokens": len(prep["ids"]), "completion_tokens": len(ids),
                             "total_tokens": len(prep["ids"]) + len(ids)}
                    if stream:
                        await resp.write(chunk({}, finish=finish, extra={"usage": usage}))
                        await resp.write(b"data: [DONE]\n\n")
                        await resp.write_eof()
                        return resp
                    text = tok.decode([t for t in ids if t != self.engine.eos], skip_special_tokens=True)
                    out = {"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": finish}],
                           "usage": usage}
                    if want_ids:
                        out["prompt_token_ids"] = prep["ids"]
                        out["choices"][0]["token_ids"] = ids
                    return web.json_response(out)
            return resp
        except ConnectionResetError:  # the client left (a realtime barge-in): stop, quietly
            log.info("request %s stopped: its client went away", rid)
            self.metrics.count(499)
            return resp
        finally:
            stop.set()  # no-op once generation ended; else it ends after the current step
            try:
                await asyncio.shield(fut)
            except Exception:  # noqa: BLE001
                pass
            if started["flag"]:
                self.running -= 1
                self.metrics.finished.inc()
            else:
                self.waiting -= 1
            self._update()

    async def drain(self):
        await self.start_draining()
        if self.owns_states_dir:  # a directory named by OMNI_MM_STATES_DIR is not ours to delete
            self.states_store.remove_all()

    async def sweep_mm_states(self, every: float = 5.0):
        while True:
            try:
                dropped = self.states_store.sweep()
                if dropped:
                    log.info("dropped %d unfetched multimodal states (TTL or size bound)", len(dropped))
            except OSError as exc:
                log.warning("sweeping %s failed: %s", self.states_store.dir, exc)
            await asyncio.sleep(every)

    def app(self):
        app = web.Application(client_max_size=self.cfg.max_request_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/tokenize", self.tokenize)
        return app

    def metrics_app(self):
        app = metrics_app(self.metrics)
        mm_states_routes(app, self.states_store)  # the same endpoint the vLLM launcher serves
        return app


async def amain(cfg: ThinkerSettings) -> int:
    svc = ThinkerService(cfg)
    sites = [(svc.app(), cfg.host, cfg.port), (svc.metrics_app(), cfg.host, cfg.metrics_port)]

    async def started():
        asyncio.ensure_future(svc.load(svc.make_engine))
        asyncio.ensure_future(svc.sweep_mm_states())

    code = await serve(sites, svc.drain, started)
    return svc.exit_code or code

"""`omni-runtime thinker --engine vllm` over a REAL `vllm serve` (vLLM's CPU build, run from
.venv-vllm) of the tiny checkpoint: readiness, queue depth following vLLM's own gauges,
the multimodal states export checked against transformers, and SIGTERM drain.

vLLM takes 1-3 minutes to start on 2 cores, so one compiled thinker (`shared`, the
production path) serves most tests and is SIGTERMed by the drain test at the end; the
drain-timeout test starts its own eager thinker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import pytest

from e2e.procs import descendants

from .helpers import chat_prompt_ids, sine_wav
from .vllm_procs import REPO, SERVED, alive, start_speech_stack

pytestmark = pytest.mark.vllm

LONG = 900  # tokens: a few seconds per request on 2 cores


# the drain-timeout test's thinker: long answers side by side with a late short one, so the work
# outlasts the drain on a fast CPU too (the tiny model writes one 4000-token answer in under 4 s)
LONG_ANSWERS = 16
DRAIN_TIMEOUT = {"eager": True, "drain_seconds": 3, "max_model_len": 4096, "max_num_seqs": LONG_ANSWERS + 1,
                 "extra_env": {"OMNI_SHUTDOWN_DELAY_SECONDS": "2"}}


@pytest.fixture(scope="module")
def thinker(vllm_thinkers):
    return vllm_thinkers.get("shared", max_num_seqs=2)


def chat_body(content, max_tokens=2, **extra) -> dict:
    return {"model": SERVED, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            "messages": [{"role": "user", "content": content}], **extra}


def post_chat(p, body: dict, rid: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"X-Request-Id": rid} if rid else {})}
    req = urllib.request.Request(p.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def get_states(p, rid: str, wait: float = 10.0) -> tuple[int, dict]:
    """The gateway's way: retry on 404 every 50 ms for a while."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/v1/omni/mm-states/{rid}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            if e.code != 404 or body.get("final") or time.monotonic() > deadline:
                return e.code, body
        time.sleep(0.05)


def encode_png(venv, w=96, h=64, seed=0) -> bytes:
    """A random RGB PNG, made with .venv-vllm's Pillow (the main environment has none)."""
    code = ("import io,sys,numpy as np\nfrom PIL import Image\n"
            f"a=np.random.default_rng({seed}).integers(0,255,({h},{w},3),dtype=np.uint8)\n"
            "b=io.BytesIO();Image.fromarray(a).save(b,format='PNG');sys.stdout.buffer.write(b.getvalue())")
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, check=True).stdout


def hf_states(venv, model, prompt_ids, **media) -> dict:
    req = {"model": str(model), "prompt_ids": prompt_ids, **media}
    out = subprocess.run([str(venv / "bin" / "python"), str(REPO / "tests" / "runtime" / "hf_reference.py")], input=json.dumps(req),
                         capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def rows(obj: dict) -> np.ndarray:
    assert obj["dtype"] == "float32"
    return np.frombuffer(base64.b64decode(obj["data"]), "<f4").reshape(obj["shape"])


def test_readiness_follows_vllm(thinker, tiny_model):
    # While vLLM loaded, the launcher already answered on its metrics port, not ready.
    assert thinker.loading_samples, "the launcher's metrics port was never seen before vLLM was ready"
    assert all(m.get("omni_ready") == 0.0 for m in thinker.loading_samples)
    with urllib.request.urlopen(thinker.url + "/health", timeout=5) as r:
        assert r.status == 200  # vLLM's own /health
    m = thinker.metrics()
    assert m["omni_ready"] == 1.0 and m["omni_thinker_engine_scrape_ok"] == 1.0 and m["omni_draining"] == 0.0
    with urllib.request.urlopen(thinker.url + "/v1/models", timeout=5) as r:
        assert [d["id"] for d in json.loads(r.read())["data"]] == [SERVED]
    # vLLM applies the checkpoint's chat template exactly as transformers does.
    messages = [{"role": "user", "content": "Say hello."}]
    out = post_chat(thinker, chat_body("Say hello."))
    assert out["prompt_token_ids"] == chat_prompt_ids(tiny_model, messages)
    assert len(out["choices"][0]["token_ids"]) == out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_exported_states_equal_transformers(thinker, tiny_model, vllm_venv, modality):
    """The rows the plugin exports for an audio / image prompt are transformers'
    hidden_states[accept_hidden_layer] at the multimodal positions (same weights, same
    inputs, fp32). The reference runs transformers in .venv-vllm (the release vLLM pins),
    where the image processor's dependencies are."""
    if modality == "audio":
        data = base64.b64encode(sine_wav(1.0)).decode()
        part, media = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, {"audio_wav_b64": data}
    else:
        data = base64.b64encode(encode_png(vllm_venv)).decode()
        part, media = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}, {"image_b64": data}
    rid = f"eq-{modality}-{int(time.time() * 1000)}"
    out = post_chat(thinker, chat_body([part, {"type": "text", "text": "What is this?"}]), rid=rid)
    assert out["id"] == f"chatcmpl-{rid}"
    status, got = get_states(thinker, rid)
    assert status == 200, got
    ref = hf_states(vllm_venv, tiny_model, out["prompt_token_ids"], **media)
    config = json.loads((tiny_model / "config.json").read_text())
    tc = config["thinker_config"]
    mm_ids = {tc["audio_token_id"], tc["image_token_id"], tc["video_token_id"]}
    n_mm = sum(t in mm_ids for t in out["prompt_token_ids"])
    assert got["layer"] == ref["layer"] == config["talker_config"]["accept_hidden_layer"]
    assert got["shape"] == ref["shape"] == [n_mm, tc["text_config"]["hidden_size"]] and n_mm > 0
    want = np.frombuffer(base64.b64decode(ref["data"]), "<f4").reshape(ref["shape"])
    assert np.abs(want).max() > 1e-3  # not trivially zero
    np.testing.assert_allclose(rows(got), want, rtol=0, atol=1e-5)
    if modality == "audio":
        assert got["audio_feature_lengths"] == ref["audio_feature_lengths"] == [100]
    else:
        assert got["image_grid_thw"] == ref["image_grid_thw"]
    assert get_states(thinker, rid, wait=0)[0] == 404  # served once


def test_states_survive_prefix_cache_hits_and_text_has_none(thinker):
    # An audio prompt long enough to fill whole KV blocks: the second request's multimodal
    # prefix is served from vLLM's prefix cache (never recomputed), yet its states come.
    data = base64.b64encode(sine_wav(1.0, rate=16000)).decode()
    content = [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
               {"type": "text", "text": "Describe the sound in detail. " * 12}]
    hits_before = thinker.vllm_metrics().get("vllm:prefix_cache_hits_total", 0.0)
    first, second = f"pc1-{time.time_ns()}", f"pc2-{time.time_ns()}"
    post_chat(thinker, chat_body(content), rid=first)
    post_chat(thinker, chat_body(content), rid=second)
    assert thinker.vllm_metrics()["vllm:prefix_cache_hits_total"] > hits_before
    s1, a = get_states(thinker, first)
    s2, b = get_states(thinker, second)
    assert s1 == s2 == 200
    np.testing.assert_allclose(rows(b), rows(a), rtol=0, atol=1e-6)
    text_rid = f"txt-{time.time_ns()}"
    post_chat(thinker, chat_body("Hello there"), rid=text_rid)
    status, body = get_states(thinker, text_rid, wait=1.0)
    assert status == 404 and "final" not in body
    bad = urllib.request.Request(f"http://127.0.0.1:{thinker.metrics_port}/v1/omni/mm-states/a%2Fb")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=5)
    assert e.value.code in (400, 404)


QUEUED_LOAD = 12  # requests for 2 slots: a queue of 2 or more lasts several rounds of LONG tokens


async def _load(p, n: int, max_tokens: int, stop_after: float = 300) -> tuple[list[dict], list, list]:
    """n concurrent long requests; meanwhile the launcher's and vLLM's metrics, each sampled on
    its own, so a slow answer from one (vLLM's API server is busy streaming) never hides the
    other, and waited for, never dropped. Returns (results, launcher samples, vLLM samples)."""
    body = chat_body("Count.", max_tokens=max_tokens, ignore_eos=True)
    done = asyncio.Event()
    launcher, engine = [], []

    async def sample(read, into):
        loop = asyncio.get_running_loop()
        while not done.is_set():
            into.append(await loop.run_in_executor(None, read))
            await asyncio.sleep(0.25)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=stop_after)) as s:
        async def one():
            async with s.post(p.url + "/v1/chat/completions", json=body) as r:
                return {"status": r.status, **(await r.json())}

        samplers = [asyncio.ensure_future(sample(lambda: p.metrics(timeout=60), launcher)),
                    asyncio.ensure_future(sample(lambda: p.vllm_metrics(timeout=60), engine))]
        try:
            results = await asyncio.gather(*(one() for _ in range(n)))
        finally:
            done.set()
            await asyncio.gather(*samplers)
    return results, launcher, engine


def test_queue_depth_follows_real_vllm_waiting(thinker):
    results, launcher, engine = asyncio.run(_load(thinker, QUEUED_LOAD, LONG))
    assert all(r["status"] == 200 and r["usage"]["completion_tokens"] == LONG for r in results)
    engine_waiting = [e.get("vllm:num_requests_waiting", 0.0) for e in engine]
    launcher_waiting = [m["omni_queue_depth"] for m in launcher]
    # --max-num-seqs 2: twelve requests make vLLM queue up to ten of them, for several rounds
    assert max(engine_waiting) >= 3, engine_waiting
    assert max(launcher_waiting) >= 2, (launcher_waiting, [m.get("omni_thinker_engine_scrape_ok") for m in launcher])
    # the launcher republishes what vLLM reported (scraped every 2 s), never more than can wait
    assert max(launcher_waiting) <= QUEUED_LOAD - 2
    assert max(m["omni_requests_running"] for m in launcher) == 2.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = thinker.metrics()
        if m["omni_queue_depth"] == 0 and m["omni_requests_running"] == 0:
            break
        time.sleep(0.5)
    assert m["omni_queue_depth"] == 0 and m["omni_requests_running"] == 0


# -- the whole path over vLLM: gateway, talker, routing ----------------------------------

SPEECH_GEN = {"max_codes": 12, "min_codes": 12, "seed": 3}


def audio_tokens(feature_frames: int) -> int:
    """Qwen3-Omni's audio encoder output length for `feature_frames` mel frames (10 ms each):
    13 tokens per full 100-frame chunk, the rest through three stride-2 convolutions."""
    rest = feature_frames % 100
    feat = (rest - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (feature_frames // 100) * 13


def encode_mp4(venv, frames=4, fps=2, size=64) -> bytes:
    """A random-noise MP4 (frames x size x size at fps), written with .venv-vllm's PyAV."""
    code = ("import io,sys,numpy as np,av\nb=io.BytesIO();c=av.open(b,'w',format='mp4')\n"
            f"s=c.add_stream('libx264' if 'libx264' in av.codecs_available else 'mpeg4',rate={fps})\n"
            f"s.width=s.height={size};s.pix_fmt='yuv420p';rng=np.random.default_rng(1)\n"
            f"for i in range({frames}):\n"
            f"    f=av.VideoFrame.from_ndarray(rng.integers(0,255,({size},{size},3),dtype=np.uint8),format='rgb24')\n"
            "    [c.mux(p) for p in s.encode(f)]\n"
            "[c.mux(p) for p in s.encode()];c.close();sys.stdout.buffer.write(b.getvalue())")
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def speech_stack(thinker, tiny_model, module_spawn):
    """gateway -> the shared vLLM thinker, and -> a recording proxy -> a real talker."""
    stack = start_speech_stack(thinker, tiny_model, module_spawn, SPEECH_GEN)
    yield stack
    stack["tap"].close()


def speech_body(content, stream=False) -> dict:
    return {"model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
            "modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "wav"}, "stream": stream}


def test_speech_for_audio_input_through_gateway_and_talker(speech_stack, tiny_model):
    """WAV in -> gateway -> vLLM thinker (states exported by the plugin, served by the
    launcher) -> gateway fetches them -> talker -> WAV out; nothing answers 501."""
    from omni_runtime.audio import parse_wav_header

    from .helpers import post_stream, run, sse_events

    gw, tap = speech_stack["gw"], speech_stack["tap"]
    tc = json.loads((tiny_model / "config.json").read_text())["thinker_config"]
    clip = sine_wav(1.0)  # 16 kHz: 100 mel frames -> 13 audio tokens
    content = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(clip).decode(), "format": "wav"}},
               {"type": "text", "text": "What is this sound?"}]
    before = len(tap.payloads)
    status, _, raw, _ = run(post_stream(gw.url + "/v1/chat/completions", speech_body(content)))
    assert status == 200, raw[:400]
    wav = base64.b64decode(json.loads(raw)["choices"][0]["message"]["audio"]["data"])
    hdr = parse_wav_header(wav)
    assert hdr["sample_rate"] == 24000 and hdr["data_size"] == len(wav) - 44
    assert hdr["data_size"] // 2 > 0.8 * 12 * 1920  # 12 codes of 1920 samples, less the decoder's edges
    pcm = np.frombuffer(wav[44:], "<i2")
    assert np.abs(pcm).max() > 0  # not silence

    # the talker got vLLM's prompt and one state row per audio token in it
    assert len(tap.payloads) == before + 1
    payload = json.loads(tap.payloads[-1])
    n_audio = payload["prompt_ids"].count(tc["audio_token_id"])
    assert n_audio == audio_tokens(100) == 13
    mm = payload["mm"]
    assert mm["shape"] == [n_audio, tc["text_config"]["hidden_size"]] and mm["audio_feature_lengths"] == [100]
    assert np.abs(rows(mm)).max() > 1e-3
    m = gw.metrics()
    assert len(mm["data"]) < m["omni_gateway_mm_states_bytes_total"] < len(mm["data"]) + 400

    # streaming: audio chunks, no error event, as much audio as the non-streamed answer
    status, _, raw, _ = run(post_stream(gw.url + "/v1/chat/completions", speech_body(content, stream=True)))
    events = sse_events(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert not any("error" in e for e in events[:-1]), events[-2]
    chunks = [base64.b64decode(e["choices"][0]["delta"]["audio"]["data"]) for e in events[:-1]
              if "data" in e["choices"][0]["delta"].get("audio", {})]
    assert chunks and len(b"".join(chunks)) == hdr["data_size"]
    assert json.loads(tap.payloads[-1])["mm"]["shape"][0] == 13
    assert 'code="501"' not in gw.metrics_text() + speech_stack["talker"].metrics_text()


def test_video_input_through_gateway_adds_its_video_tokens(speech_stack, thinker, tiny_model, vllm_venv):
    """An MP4 `video_url` data: URL through the gateway: vLLM's prompt grows by the video
    tokens the processor settings give, and the states come with it. 4 frames of 64x64:
    2 frames per temporal patch; Qwen3OmniMoeProcessor resizes video frames to at least
    128*32*32 pixels on a 32-px grid (16-px patches, 2x2 merge): 384x384, so the grid is
    [2, 24, 24] and the prompt gets 2*24*24/4 = 288 video tokens."""
    gw = speech_stack["gw"]
    cfg = json.loads((tiny_model / "config.json").read_text())
    pre = json.loads((tiny_model / "preprocessor_config.json").read_text())
    tc = cfg["thinker_config"]
    frames, size, min_pixels = 4, 64, 128 * 32 * 32
    factor = pre["patch_size"] * pre["merge_size"]
    side = math.ceil(size * math.sqrt(min_pixels / size**2) / factor) * factor  # Qwen2-VL's smart_resize, upscaling
    grid = [frames // pre["temporal_patch_size"], side // pre["patch_size"], side // pre["patch_size"]]
    want = grid[0] * grid[1] * grid[2] // pre["merge_size"] ** 2
    assert (side, want) == (384, 288)
    video = base64.b64encode(encode_mp4(vllm_venv, frames=frames, size=size)).decode()
    question = {"type": "text", "text": "What happens?"}
    part = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + video}}
    with_video = post_chat(gw, chat_body([part, question]))
    without = post_chat(gw, chat_body([question]))
    ids = with_video["prompt_token_ids"]
    assert ids.count(tc["video_token_id"]) == want
    # the pads, plus <|vision_start|> and <|vision_end|> around them
    assert len(ids) - len(without["prompt_token_ids"]) == want + 2
    # vLLM's request id came from the gateway's X-Request-Id: the launcher holds the video's states
    rid = with_video["id"].removeprefix("chatcmpl-")
    status, mm = get_states(thinker, rid)
    assert status == 200, mm
    assert mm["video_grid_thw"] == [grid] and mm["shape"] == [want, tc["text_config"]["hidden_size"]]


async def _streamed(p, n: int, max_tokens: int, first_token: asyncio.Event, stop_after: float = 120) -> list[dict]:
    """n concurrent streamed requests. `first_token` is set when any of them streams its first
    chunk, which vLLM sends only once the request is running: a certain sign, where sampled
    gauges can miss a short run. Each result: HTTP status, whether [DONE] came, the usage."""
    body = chat_body("Count.", max_tokens=max_tokens, ignore_eos=True, stream=True,
                     stream_options={"include_usage": True})

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=stop_after)) as s:
        async def one() -> dict:
            out = {"status": None, "done": False, "completion_tokens": None}
            async with s.post(p.url + "/v1/chat/completions", json=body) as r:
                out["status"] = r.status
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        out["done"] = True
                        break
                    event = json.loads(line.removeprefix("data: "))
                    if event.get("choices"):
                        first_token.set()
                    if event.get("usage"):
                        out["completion_tokens"] = event["usage"]["completion_tokens"]
            return out

        return await asyncio.gather(*(one() for _ in range(n)))


async def _started(load: asyncio.Future, first_token: asyncio.Event, timeout: float = 180) -> None:
    """Until a request streams its first chunk; fails (never hangs) if the load ends first."""
    waiter = asyncio.ensure_future(first_token.wait())
    await asyncio.wait([load, waiter], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if load.done():
        load.result()  # raises what went wrong
    assert first_token.is_set(), f"no request started streaming within {timeout:.0f}s"


async def _draining_reported(p, load: asyncio.Future) -> bool:
    """Whether the launcher reports omni_draining=1 before the load ends."""
    loop = asyncio.get_running_loop()
    while not load.done():
        try:
            if (await loop.run_in_executor(None, p.metrics)).get("omni_draining") == 1.0:
                return True
        except OSError:
            pass
        await asyncio.sleep(0.1)
    return False


def test_sigterm_drains_real_requests_in_flight(vllm_thinkers):
    """SIGTERM once a request is streaming (two running, two queued): all finish in full
    before vLLM is stopped, and the launcher exits 0 leaving no vLLM process."""
    p = vllm_thinkers.take("shared", max_num_seqs=2)
    vllm_pids = descendants(p.popen.pid)

    async def scenario():
        first_token = asyncio.Event()
        load = asyncio.ensure_future(_streamed(p, 4, LONG, first_token))
        await _started(load, first_token)
        assert not load.done()
        p.terminate()
        draining = await _draining_reported(p, load)
        return await load, draining

    results, draining = asyncio.run(scenario())
    # none lost: every request that was running or queued at SIGTERM finished in full
    assert [(r["status"], r["done"], r["completion_tokens"]) for r in results] == [(200, True, LONG)] * 4
    assert p.popen.wait(timeout=60) == 0
    assert draining, "draining was never reported"
    assert vllm_pids and not [pid for pid in vllm_pids if alive(pid)], "vLLM processes left behind"


def test_vllm_serves_through_the_shutdown_delay_and_the_drain_gives_up_after_drain_seconds(vllm_thinkers):
    """OMNI_SHUTDOWN_DELAY_SECONDS=2: a request sent after SIGTERM (as a gateway whose DNS has not
    caught up sends one) is still served in full. OMNI_DRAIN_SECONDS=3 and requests that need much
    longer: the launcher stops vLLM after the delay and the drain time, exits 0, and they are cut."""
    p = vllm_thinkers.take("drain-timeout", **DRAIN_TIMEOUT)

    async def scenario():
        first_token = asyncio.Event()
        load = asyncio.ensure_future(_streamed(p, LONG_ANSWERS, 4000, first_token, stop_after=60))
        await _started(load, first_token)
        t0 = time.monotonic()
        p.terminate()
        await asyncio.sleep(0.5)
        late = await _streamed(p, 1, 8, asyncio.Event())
        try:
            cut = any(not r["done"] or r["completion_tokens"] != 4000 for r in await load)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            cut = True
        return late, cut, t0

    late, cut, t0 = asyncio.run(scenario())
    code = p.popen.wait(timeout=60)
    waited = time.monotonic() - t0
    assert [(r["status"], r["done"], r["completion_tokens"]) for r in late] == [(200, True, 8)]
    assert cut and code == 0
    assert 5.0 <= waited < 40, waited

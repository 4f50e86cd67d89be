"""What the gateway checks in a chat request before any upstream sees it (pure).

Content parts are the ones vLLM's OpenAI server reads for Qwen3-Omni: `text`,
`image_url`, `audio_url`, `video_url` (http(s) or base64 `data:` URLs) and `input_audio`
(base64 wav/mp3). The thinker decodes the media; the gateway answers the mistakes it can
see without decoding (unknown part, bad URL or base64, wrong media type, too large) with
a 400 that says which part is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from omni_runtime.config import DEFAULT_MAX_MEDIA_BYTES
from omni_runtime.media import MediaError, b64decode, check_url_part, is_wav

INPUT_AUDIO_FORMATS = ("wav", "mp3")
OUTPUT_AUDIO_FORMATS = ("wav", "pcm16")
CONTENT_PART_TYPES = ("text", "image_url", "audio_url", "video_url", "input_audio")
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class ChatOptions:
    audio_out: bool
    voice: str
    format: str
    stream: bool
    multimodal: bool  # audio, image or video input: the prompt gets multimodal placeholder tokens


def _check_input_audio(part: dict, where: str, max_bytes: int) -> None:
    spec = part.get("input_audio")
    if not isinstance(spec, dict):
        raise BadRequest(f"{where}: input_audio must be an object with data and format")
    fmt = spec.get("format")
    if fmt not in INPUT_AUDIO_FORMATS:
        raise BadRequest(f"{where}: unsupported audio format {fmt!r}; supported: {', '.join(INPUT_AUDIO_FORMATS)}")
    try:
        raw = b64decode(spec.get("data"))
    except MediaError as exc:
        raise BadRequest(f"{where}: {exc}") from None
    if len(raw) > max_bytes:
        raise BadRequest(f"{where}: audio data is {len(raw)} bytes, more than the {max_bytes} allowed per media item")
    if fmt == "wav" and not is_wav(raw):
        raise BadRequest(f"{where}: data is not a WAV file")


def _check_content(content: list, i: int, max_media_bytes: int) -> bool:
    """Validate one message's content parts; True when one of them is media."""
    media = False
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if not isinstance(part, dict):
            raise BadRequest(f"{where} must be an object")
        kind = part.get("type")
        if kind not in CONTENT_PART_TYPES:
            raise BadRequest(f"{where}: unknown content part type {kind!r}; supported: {', '.join(CONTENT_PART_TYPES)}")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"{where}: text must be a string")
        elif kind == "input_audio":
            media = True
            _check_input_audio(part, where, max_media_bytes)
        else:
            media = True
            try:
                check_url_part(part, kind, max_media_bytes)
            except MediaError as exc:
                raise BadRequest(f"{where}: {kind}: {exc}") from None
    return media


def validate_chat(body, max_media_bytes: int = DEFAULT_MAX_MEDIA_BYTES) -> ChatOptions:
    """Validate the parts of a chat request the gateway is responsible for."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    multimodal = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        if msg.get("role") not in CHAT_ROLES:
            raise BadRequest(f"messages[{i}].role {msg.get('role')!r} is not a chat role")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or a list of content parts")
        multimodal = _check_content(content, i, max_media_bytes) or multimodal
    modalities = body.get("modalities") or ["text"]
    if not isinstance(modalities, list) or any(m not in ("text", "audio") for m in modalities):
        raise BadRequest("modalities must be a list of 'text' and 'audio'")
    audio_out = "audio" in modalities
    audio = body.get("audio") or {}
    if not isinstance(audio, dict):
        raise BadRequest("audio must be an object with voice and format")
    fmt = audio.get("format", "wav")
    if audio_out and fmt not in OUTPUT_AUDIO_FORMATS:
        raise BadRequest(f"unsupported output audio format {fmt!r}; supported: {', '.join(OUTPUT_AUDIO_FORMATS)}")
    voice = audio.get("voice", "Ethan")
    if not isinstance(voice, str) or not voice:
        raise BadRequest("audio.voice must be a string")
    n = body.get("n", 1)
    if audio_out and n not in (1, None):
        raise BadRequest("audio output supports n=1 only")
    return ChatOptions(audio_out, voice, fmt, bool(body.get("stream")), multimodal)


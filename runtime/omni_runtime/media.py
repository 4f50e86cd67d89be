"""Media references in chat content parts, as vLLM's OpenAI server reads them for
Qwen3-Omni: `image_url`, `audio_url` and `video_url` hold `{"url": ...}` with an http(s)
URL or a base64 `data:` URL; `input_audio` holds base64 `data` and a `format`.

Pure functions (no I/O, no numpy): the gateway validates with them and the transformers
thinker engine decodes with them.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import urlsplit

# content part type -> (the object key holding {"url": ...}, the media type family of its data: URLs)
URL_PARTS = {"image_url": "image", "audio_url": "audio", "video_url": "video"}
WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")
MAX_URL_CHARS = 8192  # long enough for presigned object-store URLs


class MediaError(ValueError):
    """A media reference that cannot be used; the message is safe to show to the client."""


def b64decode(data, what: str = "data") -> bytes:
    if not isinstance(data, str) or not data:
        raise MediaError(f"{what} must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what} is not valid base64") from None


def split_data_url(url: str) -> tuple[str, str]:
    """`data:<type>[;param=v]*;base64,<data>` -> (lower-case media type, the base64 text).
    The same reading as vLLM's MediaConnector (RFC 2397, base64 only)."""
    spec, sep, data = url[5:].partition(",")
    if not sep:
        raise MediaError("data URL has no ',' before its data")
    media_type, sep, encoding = spec.rpartition(";")
    if not sep or encoding.strip().lower() != "base64":
        raise MediaError("data URL must be base64: data:<type>;base64,<data>")
    return media_type.partition(";")[0].strip().lower(), data


def decode_data_url(url: str, family: str) -> tuple[str, list[bytes]]:
    """(media type, decoded blobs) of a data: URL whose type belongs to `family` (image,
    audio, video). One blob, except `video/jpeg`: vLLM reads its data as comma-separated
    base64 JPEG frames."""
    media_type, data = split_data_url(url)
    if not media_type.startswith(family + "/"):
        raise MediaError(f"data URL must be data:{family}/<type>;base64,<data>, got type {media_type or 'none'!r}")
    if media_type == "video/jpeg":
        return media_type, [b64decode(frame, f"frame {i} of the video/jpeg data") for i, frame in
                            enumerate(data.split(","))]
    return media_type, [b64decode(data, "data")]


def is_wav(raw: bytes) -> bool:
    return len(raw) >= 12 and raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"


def check_remote_url(url: str) -> None:
    """An http(s) URL the thinker may fetch; anything else (file:, ftp:, relative) is refused:
    a client must not read files of the thinker pods."""
    if len(url) > MAX_URL_CHARS:
        raise MediaError(f"URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() for c in url):
        raise MediaError("URL contains whitespace")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise MediaError(f"URL cannot be parsed: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError("URL must be an http(s) or data: URL")
    if not host:
        raise MediaError("URL has no host")


def url_of(part: dict, kind: str) -> str:
    """The `url` of an image_url/audio_url/video_url part."""
    spec = part.get(kind)
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url:
        raise MediaError(f"{kind}.url must be a non-empty string ({kind} is an object: {{\"url\": ...}})")
    return url


def check_url_part(part: dict, kind: str, max_bytes: int) -> int:
    """Validate an image_url/audio_url/video_url part; returns the decoded size of a data:
    URL (0 for http(s), which the thinker fetches under its own limits)."""
    family = URL_PARTS[kind]
    url = url_of(part, kind)
    if url[:5].lower() != "data:":
        check_remote_url(url)
        return 0
    media_type, blobs = decode_data_url(url, family)
    size = sum(len(b) for b in blobs)
    if size > max_bytes:
        raise MediaError(f"{family} data is {size} bytes, more than the {max_bytes} allowed per media item")
    if media_type in WAV_TYPES and not is_wav(blobs[0]):
        raise MediaError(f"data is not a WAV file (type {media_type})")
    return size

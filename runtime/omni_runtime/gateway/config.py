"""The gateway's configuration from OMNI_* variables (runtime/README.md lists them)."""

from __future__ import annotations

import json

from .. import env
from .pools import parse_service_list
from .validation import DEFAULT_MAX_MEDIA_BYTES


def config_from_env(environ=None) -> dict:
    cfg = env.common("gateway", environ)
    thinker = env.env_str("OMNI_THINKER_SERVICE", None, environ)
    if not thinker:
        raise env.ConfigError("OMNI_THINKER_SERVICE is required (host:port of the thinker headless Service)")
    gen_raw = env.env_str("OMNI_TALKER_GENERATION", "{}", environ)
    try:
        gen = json.loads(gen_raw)
    except json.JSONDecodeError:
        raise env.ConfigError(f"OMNI_TALKER_GENERATION is not JSON: {gen_raw!r}") from None
    cfg.update(
        thinker_service=thinker,
        talker_service=env.env_str("OMNI_TALKER_SERVICE", "", environ),
        api_keys_file=env.env_str("OMNI_API_KEYS_FILE", None, environ),
        max_request_bytes=env.env_int("OMNI_MAX_REQUEST_BYTES", 32 << 20, environ, minimum=1024),
        max_media_bytes=env.env_int("OMNI_MAX_MEDIA_BYTES", DEFAULT_MAX_MEDIA_BYTES, environ, minimum=1),
        max_attempts=env.env_int("OMNI_MAX_ATTEMPTS", 3, environ, minimum=1),
        connect_timeout=env.env_float("OMNI_CONNECT_TIMEOUT", 3.0, environ),
        read_timeout=env.env_float("OMNI_READ_TIMEOUT", 600.0, environ),
        talker_generation=gen,
        host=env.env_str("OMNI_HOST", "0.0.0.0", environ),
        scrape_seconds=_non_negative("OMNI_SCRAPE_SECONDS", 1.0, environ),
        upstream_metrics_port=env.env_int("OMNI_UPSTREAM_METRICS_PORT", 9400, environ, minimum=0),
        upstream_wait=_non_negative("OMNI_UPSTREAM_WAIT_SECONDS", 120.0, environ),
        mm_states_wait=_non_negative("OMNI_MM_STATES_WAIT_SECONDS", 10.0, environ),
        speech_streaming=_switch("OMNI_SPEECH_STREAMING", True, environ),
    )
    if cfg["upstream_metrics_port"] > 65535:
        raise env.ConfigError(f"OMNI_UPSTREAM_METRICS_PORT={cfg['upstream_metrics_port']} is not a port number")
    if 0 < cfg["scrape_seconds"] < 0.1:
        raise env.ConfigError(f"OMNI_SCRAPE_SECONDS={cfg['scrape_seconds']:g} must be 0 (off) or >= 0.1")
    for name in ("OMNI_THINKER_SERVICE", "OMNI_TALKER_SERVICE"):
        try:
            parse_service_list(cfg[name[5:].lower()])
        except env.ConfigError as exc:
            raise env.ConfigError(f"{name}: {exc}") from None
    return cfg


def _non_negative(name: str, default: float, environ) -> float:
    value = env.env_float(name, default, environ)
    if not value >= 0:  # also refuses nan
        raise env.ConfigError(f"{name}={value:g} must be >= 0")
    return value


def _switch(name: str, default: bool, environ) -> bool:
    raw = env.env_str(name, None, environ)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise env.ConfigError(f"{name}={raw!r} must be 1/true/on or 0/false/off")

"""The environment contract between the operator and the runtime containers."""

from __future__ import annotations

import logging
import os
from pathlib import Path


class ConfigError(ValueError):
    """A misconfigured environment; the message names the variable."""


def env_str(name: str, default: str | None = None, environ=None) -> str | None:
    environ = os.environ if environ is None else environ
    value = environ.get(name)
    return value if value not in (None, "") else default


def env_int(name: str, default: int, environ=None, minimum: int | None = None) -> int:
    raw = env_str(name, None, environ)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def env_float(name: str, default: float, environ=None) -> float:
    raw = env_str(name, None, environ)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def common(role: str, environ=None) -> dict:
    default_port = 8080 if role == "gateway" else 8000
    return {
        "model": env_str("OMNI_MODEL", "Qwen/Qwen3-Omni-30B-A3B-Instruct", environ),
        "revision": env_str("OMNI_MODEL_REVISION", None, environ),
        "served_model_name": env_str("OMNI_SERVED_MODEL_NAME", None, environ),
        "port": env_int("OMNI_PORT", default_port, environ, minimum=1),
        "metrics_port": env_int("OMNI_METRICS_PORT", 9400, environ, minimum=1),
        "drain_seconds": env_float("OMNI_DRAIN_SECONDS", 30.0, environ),
        "pod_name": env_str("POD_NAME", "", environ),
        "pod_namespace": env_str("POD_NAMESPACE", "", environ),
    }


DEFAULT_TERMINATION_LOG = "/dev/termination-log"  # where a kubelet reads a container's last words


def write_termination_log(path: str | None, text: str) -> None:
    """The reason a container stopped, for `kubectl describe pod` (terminated.message)."""
    path = path or DEFAULT_TERMINATION_LOG
    if path == DEFAULT_TERMINATION_LOG and not os.path.exists(path):
        return  # not in a Kubernetes container: nothing reads it
    try:
        Path(path).write_text(text + "\n")
    except OSError as exc:
        logging.getLogger("omni.env").warning("could not write the termination log %s: %s", path, exc)

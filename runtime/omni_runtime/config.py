"""The environment contract between the operator and the runtime containers: every variable by
name (`Env`, which the operator's renderer writes by) and each process's settings, typed once.

A process reads its settings with `<Settings>.from_env()`; a missing or malformed variable is a
ConfigError that names it, and the process exits with that sentence (runtime/README.md lists the
variables).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A misconfigured environment; the message names the variable."""


class Env:
    """The variables, by name. The operator renders these; nothing else spells them."""

    ROLE = "OMNI_ROLE"
    MODEL = "OMNI_MODEL"
    MODEL_REVISION = "OMNI_MODEL_REVISION"
    SERVED_MODEL_NAME = "OMNI_SERVED_MODEL_NAME"
    HOST = "OMNI_HOST"
    PORT = "OMNI_PORT"
    METRICS_PORT = "OMNI_METRICS_PORT"
    DRAIN_SECONDS = "OMNI_DRAIN_SECONDS"
    SHUTDOWN_DELAY_SECONDS = "OMNI_SHUTDOWN_DELAY_SECONDS"
    DEVICE = "OMNI_DEVICE"
    DTYPE = "OMNI_DTYPE"
    MAX_REQUEST_BYTES = "OMNI_MAX_REQUEST_BYTES"
    # thinker (vLLM launcher)
    VLLM_ARGS = "OMNI_VLLM_ARGS"
    NNODES = "OMNI_NNODES"
    MASTER_ADDR = "OMNI_MASTER_ADDR"
    MASTER_PORT = "OMNI_MASTER_PORT"
    MM_STATES_DIR = "OMNI_MM_STATES_DIR"
    MM_STATES_TTL_SECONDS = "OMNI_MM_STATES_TTL_SECONDS"
    MM_STATES_MAX_BYTES = "OMNI_MM_STATES_MAX_BYTES"
    MM_STATES_EXPORT = "OMNI_MM_STATES_EXPORT"
    MM_STATES_CACHE_BYTES = "OMNI_MM_STATES_CACHE_BYTES"
    # talker
    MAX_QUEUE = "OMNI_MAX_QUEUE"
    MAX_INFLIGHT = "OMNI_MAX_INFLIGHT"
    TALKER_FIRST_CHUNK_CODES = "OMNI_TALKER_FIRST_CHUNK_CODES"
    TALKER_CHUNK_CODES = "OMNI_TALKER_CHUNK_CODES"
    TALKER_TEXT_WAIT_SECONDS = "OMNI_TALKER_TEXT_WAIT_SECONDS"
    TALKER_DECODE = "OMNI_TALKER_DECODE"
    TALKER_MAX_TOKENS = "OMNI_TALKER_MAX_TOKENS"
    # gateway
    THINKER_SERVICE = "OMNI_THINKER_SERVICE"
    TALKER_SERVICE = "OMNI_TALKER_SERVICE"
    API_KEYS_FILE = "OMNI_API_KEYS_FILE"
    MAX_MEDIA_BYTES = "OMNI_MAX_MEDIA_BYTES"
    MAX_ATTEMPTS = "OMNI_MAX_ATTEMPTS"
    CONNECT_TIMEOUT = "OMNI_CONNECT_TIMEOUT"
    READ_TIMEOUT = "OMNI_READ_TIMEOUT"
    TALKER_GENERATION = "OMNI_TALKER_GENERATION"
    SCRAPE_SECONDS = "OMNI_SCRAPE_SECONDS"
    UPSTREAM_METRICS_PORT = "OMNI_UPSTREAM_METRICS_PORT"
    UPSTREAM_WAIT_SECONDS = "OMNI_UPSTREAM_WAIT_SECONDS"
    MM_STATES_WAIT_SECONDS = "OMNI_MM_STATES_WAIT_SECONDS"
    SPEECH_STREAMING = "OMNI_SPEECH_STREAMING"
    REALTIME_MAX_SESSIONS = "OMNI_REALTIME_MAX_SESSIONS"
    REALTIME_MAX_SESSION_SECONDS = "OMNI_REALTIME_MAX_SESSION_SECONDS"
    REALTIME_IDLE_SECONDS = "OMNI_REALTIME_IDLE_SECONDS"
    REALTIME_MAX_BUFFER_SECONDS = "OMNI_REALTIME_MAX_BUFFER_SECONDS"
    REALTIME_MAX_HISTORY_AUDIO_SECONDS = "OMNI_REALTIME_MAX_HISTORY_AUDIO_SECONDS"
    REALTIME_MAX_EVENT_BYTES = "OMNI_REALTIME_MAX_EVENT_BYTES"
    REALTIME_THINKER_PARAMS = "OMNI_REALTIME_THINKER_PARAMS"
    # weight loader
    WEIGHTS_DIR = "OMNI_WEIGHTS_DIR"
    TERMINATION_LOG = "OMNI_TERMINATION_LOG"
    # the process
    LOG_LEVEL = "OMNI_LOG_LEVEL"
    THINKER_ENGINE = "OMNI_THINKER_ENGINE"


DEFAULT_TERMINATION_LOG = "/dev/termination-log"  # where a kubelet reads a container's last words
DEFAULT_MODEL = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
DEFAULT_MAX_MEDIA_BYTES = 25 << 20  # vLLM's own default cap for one audio clip (VLLM_MAX_AUDIO_CLIP_FILESIZE_MB)
# How long after SIGTERM a pod still gets new requests: its removal from the Service's endpoints
# reaches kube-proxy on every node, ingress controllers and the gateways' DNS over seconds.
DEFAULT_SHUTDOWN_DELAY_SECONDS = 10.0

Port = Annotated[int, Field(ge=1, le=65535)]
OptionalPort = Annotated[int, Field(ge=0, le=65535)]  # 0: none
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Bytes = Annotated[int, Field(ge=1024)]


class Settings(BaseModel):
    """Settings read from the environment: each field's alias is its variable."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        try:
            return cls.model_validate({k: v for k, v in environ.items() if v != ""})
        except ValidationError as err:
            raise ConfigError(describe(err, cls)) from None


def describe(err: ValidationError, settings: type[BaseModel]) -> str:
    """One sentence per bad variable: `OMNI_PORT='x': Input should be a valid integer`."""
    meaning = {info.alias: info.description for info in settings.model_fields.values() if info.description}
    problems = []
    for problem in err.errors():
        name = str(problem["loc"][0]) if problem["loc"] else ""
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "missing":
            problems.append(f"{name} is required" + (f" ({meaning[name]})" if name in meaning else ""))
        elif name:
            problems.append(f"{name}={problem['input']!r}: {message}")
        else:
            problems.append(message)
    return "; ".join(problems)


class ServingSettings(Settings):
    """What every serving role reads: the model, its ports, and the drain."""

    model: str = Field(DEFAULT_MODEL, alias=Env.MODEL)
    revision: str | None = Field(None, alias=Env.MODEL_REVISION)
    served_model_name: str | None = Field(None, alias=Env.SERVED_MODEL_NAME)
    host: str = Field("0.0.0.0", alias=Env.HOST)
    port: Port = Field(8000, alias=Env.PORT)
    metrics_port: Port = Field(9400, alias=Env.METRICS_PORT)
    drain_seconds: NonNegative = Field(30.0, alias=Env.DRAIN_SECONDS)
    pod_name: str = Field("", alias="POD_NAME")
    pod_namespace: str = Field("", alias="POD_NAMESPACE")


class MMStatesSettings(Settings):
    """Where vLLM's plugin writes a request's multimodal states, and how long and how much the
    thinker keeps of them."""

    dir: Path | None = Field(None, alias=Env.MM_STATES_DIR, description="unset: a private directory")
    ttl: Positive = Field(120.0, alias=Env.MM_STATES_TTL_SECONDS)
    max_bytes: Annotated[int, Field(ge=1)] = Field(1 << 30, alias=Env.MM_STATES_MAX_BYTES)
    export: bool = Field(True, alias=Env.MM_STATES_EXPORT)


class ThinkerSettings(ServingSettings):
    """`omni-runtime thinker --engine transformers` (CPU and development)."""

    device: str = Field("cpu", alias=Env.DEVICE)
    dtype: str | None = Field(None, alias=Env.DTYPE)
    max_request_bytes: Bytes = Field(64 << 20, alias=Env.MAX_REQUEST_BYTES)
    mm_states: MMStatesSettings = MMStatesSettings()

    @model_validator(mode="before")
    @classmethod
    def _read_mm_states(cls, values: Any) -> Any:
        if isinstance(values, dict) and "mm_states" not in values:
            values = {**values, "mm_states": MMStatesSettings.model_validate(values)}
        return values


class LauncherSettings(ThinkerSettings):
    """`omni-runtime thinker --engine vllm`: the vLLM arguments and where this pod stands in its replica."""

    vllm_args: list[str] = Field(default_factory=list, alias=Env.VLLM_ARGS)
    shutdown_delay: NonNegative = Field(DEFAULT_SHUTDOWN_DELAY_SECONDS, alias=Env.SHUTDOWN_DELAY_SECONDS,
                                        description="after SIGTERM, vLLM keeps running at least this long")
    nnodes: Annotated[int, Field(ge=1)] = Field(1, alias=Env.NNODES)
    master_addr: str | None = Field(None, alias=Env.MASTER_ADDR)
    master_port: Port = Field(29501, alias=Env.MASTER_PORT)

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        """A JSON list of strings; numbers are accepted and stringified."""
        if not isinstance(value, str):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at char {exc.pos})") from None
        if not isinstance(parsed, list):
            raise ValueError(f"must be a JSON list of strings, got {type(parsed).__name__}")
        for i, item in enumerate(parsed):
            if not isinstance(item, (str, int, float)) or isinstance(item, bool):
                raise ValueError(f"item {i} must be a string, got {json.dumps(item)}")
        return [str(item) for item in parsed]


class TalkerSettings(ServingSettings):
    """`omni-runtime talker`."""

    max_queue: Annotated[int, Field(ge=0)] = Field(16, alias=Env.MAX_QUEUE)
    max_inflight: Annotated[int, Field(ge=1)] = Field(16, alias=Env.MAX_INFLIGHT)
    device: str = Field("cuda", alias=Env.DEVICE)
    dtype: str | None = Field(None, alias=Env.DTYPE)
    max_request_bytes: Bytes = Field(64 << 20, alias=Env.MAX_REQUEST_BYTES)
    first_chunk: Annotated[int, Field(ge=1)] = Field(4, alias=Env.TALKER_FIRST_CHUNK_CODES)
    chunk: Annotated[int, Field(ge=1)] = Field(25, alias=Env.TALKER_CHUNK_CODES)
    text_wait: Positive = Field(30.0, alias=Env.TALKER_TEXT_WAIT_SECONDS)
    # graphs: fixed shapes (static KV slots, batch and length buckets) replayed as CUDA graphs on
    # CUDA, the same fixed shapes without graphs on CPU; fixed: no graphs; eager: transformers'
    # forward over a dynamic KV cache (the reference, and the way back if the others misbehave).
    decode: Literal["graphs", "fixed", "eager"] = Field("graphs", alias=Env.TALKER_DECODE)
    # positions one synthesis holds in its KV slot (prompt and codes); the operator renders the
    # context length it sized the talker for. 20 KiB each on the real model.
    max_tokens: Annotated[int, Field(ge=64)] = Field(8192, alias=Env.TALKER_MAX_TOKENS)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("must be cpu, cuda or cuda:N")
        return value


class GatewaySettings(ServingSettings):
    """`omni-runtime gateway`."""

    port: Port = Field(8080, alias=Env.PORT)
    thinker_service: str = Field(alias=Env.THINKER_SERVICE, description="host:port of the thinker headless Service")
    talker_service: str = Field("", alias=Env.TALKER_SERVICE)
    api_keys_file: Path | None = Field(None, alias=Env.API_KEYS_FILE)
    max_request_bytes: Bytes = Field(32 << 20, alias=Env.MAX_REQUEST_BYTES)
    max_media_bytes: Annotated[int, Field(ge=1)] = Field(DEFAULT_MAX_MEDIA_BYTES, alias=Env.MAX_MEDIA_BYTES)
    max_attempts: Annotated[int, Field(ge=1)] = Field(3, alias=Env.MAX_ATTEMPTS)
    connect_timeout: Positive = Field(3.0, alias=Env.CONNECT_TIMEOUT)
    read_timeout: Positive = Field(600.0, alias=Env.READ_TIMEOUT)
    talker_generation: dict[str, Any] = Field(default_factory=dict, alias=Env.TALKER_GENERATION)
    scrape_seconds: NonNegative = Field(1.0, alias=Env.SCRAPE_SECONDS)
    upstream_metrics_port: OptionalPort = Field(9400, alias=Env.UPSTREAM_METRICS_PORT)
    upstream_wait: NonNegative = Field(120.0, alias=Env.UPSTREAM_WAIT_SECONDS)
    mm_states_wait: NonNegative = Field(10.0, alias=Env.MM_STATES_WAIT_SECONDS)
    speech_streaming: bool = Field(True, alias=Env.SPEECH_STREAMING)
    shutdown_delay: NonNegative = Field(DEFAULT_SHUTDOWN_DELAY_SECONDS, alias=Env.SHUTDOWN_DELAY_SECONDS,
                                        description="after SIGTERM, new requests are still served this long")
    # /v1/realtime (docs/realtime.md)
    realtime_max_sessions: Annotated[int, Field(ge=0)] = Field(64, alias=Env.REALTIME_MAX_SESSIONS,
                                                              description="open sessions per pod; 0 turns it off")
    realtime_max_session_seconds: Positive = Field(1800.0, alias=Env.REALTIME_MAX_SESSION_SECONDS)
    realtime_idle_seconds: Positive = Field(300.0, alias=Env.REALTIME_IDLE_SECONDS)
    realtime_max_buffer_seconds: Positive = Field(120.0, alias=Env.REALTIME_MAX_BUFFER_SECONDS)
    realtime_max_history_audio_seconds: Positive = Field(180.0, alias=Env.REALTIME_MAX_HISTORY_AUDIO_SECONDS)
    realtime_max_event_bytes: Bytes = Field(16 << 20, alias=Env.REALTIME_MAX_EVENT_BYTES)
    realtime_thinker_params: dict[str, Any] = Field(default_factory=dict, alias=Env.REALTIME_THINKER_PARAMS)

    @field_validator("talker_generation", "realtime_thinker_params", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("is not JSON") from None
        return value

    @field_validator("realtime_thinker_params")
    @classmethod
    def _thinker_params(cls, value: dict) -> dict:
        # sampling settings only: the session decides what is asked and how it is streamed
        taken = sorted(set(value) & {"messages", "model", "stream", "stream_options", "modalities", "audio",
                                     "return_token_ids", "n"})
        if taken:
            raise ValueError(f"sets {', '.join(taken)}, which each realtime turn decides itself")
        return value

    @field_validator("scrape_seconds")
    @classmethod
    def _scrape(cls, value: float) -> float:
        if 0 < value < 0.1:
            raise ValueError("must be 0 (off) or >= 0.1")
        return value

    @field_validator("thinker_service", "talker_service")
    @classmethod
    def _services(cls, value: str) -> str:
        from omni_runtime.gateway.pools import parse_service_list

        try:
            parse_service_list(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return value


class LoaderSettings(Settings):
    """`omni-runtime fetch-weights`: one revision of a repository onto the weights volume."""

    repo: str = Field(alias=Env.MODEL, description="the repository to fetch, e.g. " + DEFAULT_MODEL)
    revision: str = Field("main", alias=Env.MODEL_REVISION)
    weights_dir: Path = Field(Path("/weights"), alias=Env.WEIGHTS_DIR)
    host: str = Field("0.0.0.0", alias=Env.HOST)
    metrics_port: OptionalPort = Field(9400, alias=Env.METRICS_PORT)
    endpoint: str | None = Field(None, alias="HF_ENDPOINT")
    token: str | None = Field(None, alias="HF_TOKEN", repr=False)
    termination_log: str = Field(DEFAULT_TERMINATION_LOG, alias=Env.TERMINATION_LOG)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None


def write_termination_log(path: str | None, text: str) -> None:
    """The reason a container stopped, for `kubectl describe pod` (terminated.message)."""
    path = path or DEFAULT_TERMINATION_LOG
    if path == DEFAULT_TERMINATION_LOG and not os.path.exists(path):
        return  # not in a Kubernetes container: nothing reads it
    try:
        Path(path).write_text(text + "\n")
    except OSError as exc:
        logging.getLogger("omni.config").warning("could not write the termination log %s: %s", path, exc)

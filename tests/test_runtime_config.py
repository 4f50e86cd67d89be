"""The environment contract (omni_runtime.config): what each runtime process reads, its defaults and
errors, and that every variable the operator renders is one the receiving process reads."""

from __future__ import annotations

import pytest

from omni_operator.rendering.plan import plan_offline
from omni_runtime.config import (ConfigError, Env, GatewaySettings, LauncherSettings, LoaderSettings, Settings,
                                 TalkerSettings, ThinkerSettings)

from .helpers import example

pytestmark = pytest.mark.pure

GATEWAY = {Env.THINKER_SERVICE: "t:8000"}


def test_gateway_defaults_and_overrides():
    cfg = GatewaySettings.from_env(GATEWAY)
    assert (cfg.port, cfg.scrape_seconds, cfg.upstream_metrics_port, cfg.upstream_wait) == (8080, 1.0, 9400, 120.0)
    assert (cfg.max_media_bytes, cfg.mm_states_wait, cfg.speech_streaming) == (25 << 20, 10.0, True)
    assert (cfg.shutdown_delay, cfg.drain_seconds) == (10.0, 30.0)
    assert LauncherSettings.from_env({Env.SHUTDOWN_DELAY_SECONDS: "4"}).shutdown_delay == 4.0
    cfg = GatewaySettings.from_env({**GATEWAY, Env.SCRAPE_SECONDS: "0", Env.UPSTREAM_WAIT_SECONDS: "0",
                                    Env.MAX_MEDIA_BYTES: "1000", Env.MM_STATES_WAIT_SECONDS: "0.5",
                                    Env.TALKER_GENERATION: '{"temperature": 0.7}', Env.PORT: ""})
    assert (cfg.scrape_seconds, cfg.upstream_wait, cfg.max_media_bytes, cfg.mm_states_wait) == (0, 0, 1000, 0.5)
    assert cfg.talker_generation == {"temperature": 0.7} and cfg.port == 8080  # empty means unset
    for off in ("0", "false", "OFF"):
        assert GatewaySettings.from_env({**GATEWAY, Env.SPEECH_STREAMING: off}).speech_streaming is False


def test_realtime_settings():
    cfg = GatewaySettings.from_env(GATEWAY)
    assert (cfg.realtime_max_sessions, cfg.realtime_max_session_seconds, cfg.realtime_idle_seconds) == (64, 1800, 300)
    assert (cfg.realtime_max_buffer_seconds, cfg.realtime_max_history_audio_seconds) == (120, 180)
    assert (cfg.realtime_max_event_bytes, cfg.realtime_thinker_params) == (16 << 20, {})
    cfg = GatewaySettings.from_env({**GATEWAY, Env.REALTIME_MAX_SESSIONS: "0",
                                    Env.REALTIME_THINKER_PARAMS: '{"temperature": 0.6, "seed": 1}'})
    assert cfg.realtime_max_sessions == 0 and cfg.realtime_thinker_params == {"temperature": 0.6, "seed": 1}
    with pytest.raises(ConfigError, match="OMNI_REALTIME_THINKER_PARAMS=.*messages, stream, which each realtime turn"):
        GatewaySettings.from_env({**GATEWAY, Env.REALTIME_THINKER_PARAMS: '{"stream": false, "messages": []}'})


@pytest.mark.parametrize("name, value", [
    (Env.REALTIME_MAX_SESSIONS, "-1"), (Env.REALTIME_IDLE_SECONDS, "0"), (Env.REALTIME_MAX_EVENT_BYTES, "100"),
    (Env.REALTIME_THINKER_PARAMS, "{not json"),
    (Env.SCRAPE_SECONDS, "-1"), (Env.SCRAPE_SECONDS, "0.01"), (Env.UPSTREAM_WAIT_SECONDS, "soon"),
    (Env.UPSTREAM_WAIT_SECONDS, "nan"), (Env.UPSTREAM_METRICS_PORT, "99999"), (Env.TALKER_SERVICE, "x:1|y"),
    (Env.MAX_MEDIA_BYTES, "0"), (Env.MM_STATES_WAIT_SECONDS, "-1"), (Env.MM_STATES_WAIT_SECONDS, "later"),
    (Env.SPEECH_STREAMING, "sometimes"), (Env.TALKER_GENERATION, "{not json"), (Env.PORT, "70000"),
    (Env.SHUTDOWN_DELAY_SECONDS, "-1"),
])
def test_a_bad_value_is_an_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=f"^{name}={value!r}: "):
        GatewaySettings.from_env({**GATEWAY, name: value})


def test_a_missing_variable_is_named_with_what_it_is():
    with pytest.raises(ConfigError, match=r"OMNI_THINKER_SERVICE is required \(host:port of the thinker"):
        GatewaySettings.from_env({})
    with pytest.raises(ConfigError, match=r"OMNI_MODEL is required \(the repository to fetch"):
        LoaderSettings.from_env({})


def test_talker_thinker_and_loader_settings():
    talker = TalkerSettings.from_env({Env.MAX_INFLIGHT: "32", Env.DEVICE: "cuda:1"})
    assert (talker.max_inflight, talker.max_queue, talker.device, talker.port) == (32, 16, "cuda:1", 8000)
    with pytest.raises(ConfigError, match="OMNI_DEVICE='tpu': must be cpu, cuda or cuda:N"):
        TalkerSettings.from_env({Env.DEVICE: "tpu"})
    with pytest.raises(ConfigError, match=Env.TALKER_TEXT_WAIT_SECONDS):
        TalkerSettings.from_env({Env.TALKER_TEXT_WAIT_SECONDS: "0"})
    assert (talker.decode, talker.max_tokens) == ("graphs", 8192)
    eager = TalkerSettings.from_env({Env.TALKER_DECODE: "eager", Env.TALKER_MAX_TOKENS: "20000"})
    assert (eager.decode, eager.max_tokens) == ("eager", 20000)
    for bad in ({Env.TALKER_DECODE: "compiled"}, {Env.TALKER_MAX_TOKENS: "10"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TalkerSettings.from_env(bad)
    assert ThinkerSettings.from_env({}).device == "cpu"
    loader = LoaderSettings.from_env({Env.MODEL: "o/m", "HF_ENDPOINT": "http://hub/", "HF_TOKEN": "secret"})
    assert (loader.revision, str(loader.weights_dir), loader.endpoint) == ("main", "/weights", "http://hub")
    assert "secret" not in repr(loader)


def test_multimodal_states_settings_come_with_the_thinker_s():
    cfg = ThinkerSettings.from_env({}).mm_states
    assert cfg.dir is None and cfg.export and cfg.ttl == 120 and cfg.max_bytes == 1 << 30
    cfg = LauncherSettings.from_env({Env.MM_STATES_DIR: "/x", Env.MM_STATES_TTL_SECONDS: "5",
                                     Env.MM_STATES_MAX_BYTES: "1000", Env.MM_STATES_EXPORT: "0"}).mm_states
    assert (str(cfg.dir), cfg.ttl, cfg.max_bytes, cfg.export) == ("/x", 5.0, 1000, False)
    for bad in ({Env.MM_STATES_TTL_SECONDS: "0"}, {Env.MM_STATES_MAX_BYTES: "lots"}, {Env.MM_STATES_EXPORT: "maybe"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            LauncherSettings.from_env(bad)


def test_vllm_args_are_a_json_list_of_strings():
    assert LauncherSettings.from_env({}).vllm_args == []
    assert LauncherSettings.from_env({Env.VLLM_ARGS: '["--max-num-seqs", 8, "--x", 0.9]'}).vllm_args == [
        "--max-num-seqs", "8", "--x", "0.9"]
    for raw, needle in [("[--tp 4", "not valid JSON"), ('{"tp": 4}', "must be a JSON list"),
                        ('["--x", {"n": 8}]', "item 1 must be a string"), ('["--x", true]', "item 1 must be a string")]:
        with pytest.raises(ConfigError, match=needle):
            LauncherSettings.from_env({Env.VLLM_ARGS: raw})


READERS: dict[str, type[Settings]] = {"thinker": LauncherSettings, "talker": TalkerSettings,
                                      "gateway": GatewaySettings, "weights": LoaderSettings}
SET_BY_THE_NODE = {"POD_NAME", "POD_NAMESPACE"}  # the downward API, read by every role


@pytest.mark.parametrize("name", ["omni.yaml", "thinking.yaml", "long-video-multinode.yaml"])
def test_every_variable_the_operator_renders_is_read_by_its_process(name):
    """The operator's renderer and the runtime share the names (Env); this holds each rendered
    container's OMNI_* variables against the settings of the process it runs, and parses them."""
    seen = set()
    for obj in plan_offline(example(name)).objects:
        pod = (obj.get("spec") or {}).get("template", {}).get("spec")
        if not pod:
            continue
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in pod["containers"]:
            reader = READERS[component]
            read = {info.alias for info in reader.model_fields.values()}
            for field in reader.model_fields.values():  # nested settings read the same environment
                nested = field.annotation if isinstance(field.annotation, type) else None
                if nested is not None and issubclass(nested, Settings):
                    read |= {info.alias for info in nested.model_fields.values()}
            values = {e["name"]: e.get("value", "x") for e in container["env"]}
            rendered = {n for n in values if n.startswith("OMNI_")} - {Env.ROLE}
            assert rendered <= read, f"{component} renders {sorted(rendered - read)}, which its process never reads"
            reader.from_env(values)  # and every value parses
            seen.add(component)
    assert {"thinker", "gateway"} <= seen

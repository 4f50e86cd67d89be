"""The OpenAI-compatible front door (`omni-runtime gateway`).

    POST /v1/chat/completions   text: proxied to the least-loaded thinker (stream or not)
                                modalities containing "audio": thinker (text + token ids) ->
                                multimodal states for media input -> talker payload ->
                                least-loaded talker, opened while the thinker still writes;
                                transcript and audio as OpenAI-style `audio` deltas
    GET  /v1/models
    GET  /health                200 serving, 503 from SIGTERM on (drain.py)

Modules, one concern each:
    validation  what a chat request may contain (content parts, media URLs, audio options); pure
    auth        API keys
    pools       endpoints of a role, their load, the order to try them in
    upstream    calling a role: failover, holding while no replica is reachable, load scraping
    sse         OpenAI stream framing and reading a thinker's stream; pure
    mm_states   fetching a request's multimodal thinker states for the talker
    speech      the speech pipeline (thinker -> states -> talker -> audio to the client)
    handoff     the streamed talker request body: payload head line, then ids as they come
    speech_client  the client's side of a speech request: SSE deltas or one JSON answer
    drain       the stop sequence: not ready, still serving while endpoints propagate, then
                refusing new work while in-flight work finishes; hooks other parts join
    app         the aiohttp application, request accounting, the text proxy, amain
"""

from omni_runtime.gateway.app import Gateway, amain

__all__ = ["Gateway", "amain"]

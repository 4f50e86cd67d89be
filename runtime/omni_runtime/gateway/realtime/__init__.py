"""Realtime voice sessions: the OpenAI Realtime (GA) protocol over a WebSocket at
`GET /v1/realtime` (docs/realtime.md: the subset served, limits, drain, scaling).

Modules, one concern each:
    protocol      session settings, client event checks, server event envelopes, errors; pure
    conversation  a session's items and the chat messages they make for the thinker; pure
    session       the session state machine: events and speech scores in, events and actions out; pure
    vad           server VAD: Silero scores -> speech start/stop; the detector pool
    resample      PCM16 <-> float, streaming polyphase resampling (24 kHz <-> 16 kHz)
    responder     one response over the thinker and talker (speech.py's pipeline), cancellable
    endpoint      the aiohttp WebSocket handler: admission, reading, writing, timers, drain
"""

from omni_runtime.gateway.realtime.endpoint import RealtimeEndpoint

__all__ = ["RealtimeEndpoint"]

"""Runtime processes of a Qwen3-Omni deployment: thinker launcher, talker speech
server, gateway, and the metrics they export."""

__version__ = "0.1.0"

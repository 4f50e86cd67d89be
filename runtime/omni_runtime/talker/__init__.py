"""The talker role: the speech server, its continuous-batching decode loop, the engine and sampling."""

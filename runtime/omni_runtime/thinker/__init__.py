"""The thinker role: the vLLM launcher and plugin (multimodal states for the talker), and the transformers engine for CPU."""

"""GPU sizing from the model card (pure): the memory table, the KV cache, GPUs per replica."""

"""DPO training: per-worker loop, DeepSpeed engine, checkpoints."""

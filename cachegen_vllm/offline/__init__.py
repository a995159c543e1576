"""Offline tools: quality of profiles on real KV (`quality`), per-layer widths fitted to a model
(`calibrate`), KV and frames files (`kvfile`, ``cachegen-vllm kv``) and the embedded model
(`model`)."""

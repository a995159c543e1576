"""What the connector supports, checked once at start-up on both sides: a refusal names the vLLM
setting that asks for what is not supported yet (`ConfigError`), instead of a cache misread later
or an error from deep inside an encode."""

from __future__ import annotations

from typing import Any

from cachegen_vllm.codec.profile import ConfigError

# vLLM --kv-cache-dtype settings the connector codes: the model's dtype, or fp8 scaled per layer
CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


def check_supported(vllm_config: Any, kv_cache_config: Any | None) -> None:
    """Refuse, naming the field: pipeline parallelism, speculative decoding (a drafter's layers
    get caches beside the target's), KV cache dtypes other than the model's and fp8 with one scale
    per layer, MLA (a latent is not K and V), values narrower or wider than keys, and several KV
    cache groups (hybrid models)."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ConfigError("pipeline_parallel_size", "CacheGenConnector does not support pipeline parallelism yet")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ConfigError(
            "speculative_config",
            "CacheGenConnector does not transfer a drafter's KV yet (its layers would count as the model's)",
        )
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in CACHE_DTYPES:
        raise ConfigError(
            "kv_cache_dtype",
            f"CacheGenConnector codes KV caches in {', '.join(CACHE_DTYPES)} (--kv-cache-dtype), "
            f"not {cache_dtype!r} yet",
        )
    if getattr(vllm_config.model_config, "use_mla", False):
        raise ConfigError(
            "use_mla", "CacheGenConnector does not code MLA latent caches yet (it would split one as K, V)"
        )
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if len(groups) > 1:
        raise ConfigError(
            "kv_cache_groups",
            f"CacheGenConnector supports one KV cache group, this model has {len(groups)} (a hybrid attention model)",
        )
    for group in groups:
        spec = group.kv_cache_spec
        head_size, head_size_v = spec.head_size, getattr(spec, "head_size_v", spec.head_size)
        if head_size_v != head_size:
            raise ConfigError(
                "head_size_v",
                f"CacheGenConnector needs values as wide as keys; this model's are {head_size_v} and {head_size}",
            )

"""What the connector supports, checked once at start-up on both sides: a refusal names the vLLM
setting that asks for what is not supported yet (`ConfigError`), instead of a cache misread later
or an error from deep inside an encode."""

from __future__ import annotations

from typing import Any

from cachegen_vllm.codec.profile import ConfigError, Profile

# vLLM --kv-cache-dtype settings the connector codes: the model's dtype, or fp8 scaled per layer
CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
# the KV cache groups' kinds the connector sends: full attention (the whole prompt; also a sliding
# layer's when vLLM's hybrid manager is off), sliding windows (their last window), MLA latents and
# SSM layers (their state at the prompt's end)
SENT_SPECS = ("FullAttentionSpec", "SlidingWindowSpec", "MLAAttentionSpec", "MambaSpec")
MAX_WINDOW = (1 << 16) - 1  # a frame's `window` field


def _holds_states(group: Any) -> bool:
    """Whether a KV cache group is an SSM layers' (vLLM's Mamba layers: one state per request)."""
    return type(group.kv_cache_spec).__name__ == "MambaSpec"


def layer_groups(kv_cache_config: Any | None) -> dict[str, tuple[int, int]]:
    """Each layer's (KV cache group, sliding window in tokens, 0 for full attention), by layer name,
    as vLLM's KV cache manager keeps them: with the hybrid manager a sliding-window layer keeps its
    last window only, in a group of its own; without it, every token (one group)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    windows = [
        int(g.kv_cache_spec.sliding_window) if type(g.kv_cache_spec).__name__ == "SlidingWindowSpec" else 0
        for g in groups
    ]
    return {
        name: (index, windows[index])
        for index, group in enumerate(groups)
        if not _holds_states(group)
        for name in group.layer_names
    }


def state_layers(kv_cache_config: Any | None) -> dict[str, tuple[int, int, int]]:
    """Each SSM layer's (KV cache group, state bytes, tokens per block of its group), by layer
    name: vLLM's Mamba layers, whose state the decode needs instead of their tokens."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    return {
        name: (index, int(group.kv_cache_spec.real_page_size_bytes), int(group.kv_cache_spec.block_size))
        for index, group in enumerate(groups)
        if _holds_states(group)
        for name in group.layer_names
    }


def check_supported(vllm_config: Any, kv_cache_config: Any | None) -> None:
    """Refuse, naming the field: pipeline parallelism, speculative decoding (a drafter's layers
    get caches beside the target's), KV cache dtypes other than the model's and fp8 with one scale
    per layer (an MLA latent only in the model's dtype), values narrower or wider than keys, and
    KV cache groups other than full attention, sliding windows, MLA latents and SSM layers (whose
    states move between single-rank instances only, so far)."""
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
    if getattr(vllm_config.model_config, "use_mla", False) and cache_dtype != "auto":
        raise ConfigError(
            "kv_cache_dtype", f"CacheGenConnector codes MLA latents in the model's dtype (auto), not {cache_dtype!r}"
        )
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    for group in groups:
        spec = group.kv_cache_spec
        kind = type(spec).__name__
        if kind not in SENT_SPECS:
            raise ConfigError(
                "kv_cache_groups",
                f"CacheGenConnector sends {', '.join(SENT_SPECS)} groups; layers {group.layer_names[:2]}... "
                f"are a {kind} group, and it does not send them yet",
            )
        if kind == "MambaSpec":
            if vllm_config.parallel_config.tensor_parallel_size > 1:
                raise ConfigError(
                    "tensor_parallel_size",
                    "CacheGenConnector sends an SSM hybrid's states between single-rank instances only, so far",
                )
            continue
        if kind == "SlidingWindowSpec" and not 0 < spec.sliding_window <= MAX_WINDOW:
            raise ConfigError(
                "sliding_window",
                f"CacheGenConnector sends windows of 1 to {MAX_WINDOW} tokens, not {spec.sliding_window}",
            )
        head_size, head_size_v = spec.head_size, getattr(spec, "head_size_v", spec.head_size)
        if kind == "MLAAttentionSpec":
            if head_size % 2:
                raise ConfigError("head_size", f"CacheGenConnector codes MLA latents of even widths, not {head_size}")
        elif head_size_v != head_size:
            raise ConfigError(
                "head_size_v",
                f"CacheGenConnector needs values as wide as keys; this model's are {head_size_v} and {head_size}",
            )


def check_latent_levels(profiles: tuple[Profile, ...]) -> None:
    """A producer of an MLA model codes its latents at exact and lossless widths, and at lossy ones
    only where a profile says ``lossy_latents = true`` (ConfigError naming the profile otherwise)."""
    for profile in profiles:
        if profile.lossy and not profile.lossy_latents:
            raise ConfigError(
                "profile",
                f"{profile.name!r} codes at lossy widths, which an MLA latent takes only where the profile "
                "says lossy_latents = true (their cost was never measured on a real MLA model): use raw or "
                "lossless",
            )

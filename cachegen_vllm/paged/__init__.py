"""vLLM's paged KV cache: its page layouts (`layout`, a leaf: gather and scatter of a request's
tokens, manager blocks as kernel blocks) and a worker's caches bound once with the codec on them
(`caches.PagedCaches`: encode from and decode into a request's blocks)."""

from cachegen_vllm.paged.caches import PagedCaches, PendingEncode
from cachegen_vllm.paged.layout import FP8_CACHE_DTYPES, PageOrder, gather, kernel_block_ids, probe_page_order, scatter

__all__ = [
    "FP8_CACHE_DTYPES",
    "PageOrder",
    "PagedCaches",
    "PendingEncode",
    "gather",
    "kernel_block_ids",
    "probe_page_order",
    "scatter",
]

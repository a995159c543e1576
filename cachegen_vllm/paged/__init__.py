"""vLLM's paged KV cache: its page layouts (`layout`, a leaf: gather and scatter of a request's
tokens, manager blocks as kernel blocks) and the codec on it (`codec`: `start_encode` /
`encode_blocks`, `decode_frames_into_blocks` / `decode_into_blocks`)."""

from cachegen_vllm.paged.codec import (
    PendingEncode,
    decode_frames_into_blocks,
    decode_into_blocks,
    encode_blocks,
    start_encode,
    time_encode,
    warm_up,
)
from cachegen_vllm.paged.layout import FP8_CACHE_DTYPES, PageOrder, gather, kernel_block_ids, probe_page_order, scatter

__all__ = [
    "FP8_CACHE_DTYPES",
    "PageOrder",
    "PendingEncode",
    "decode_frames_into_blocks",
    "decode_into_blocks",
    "encode_blocks",
    "gather",
    "kernel_block_ids",
    "probe_page_order",
    "scatter",
    "start_encode",
    "time_encode",
    "warm_up",
]

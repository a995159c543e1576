"""vLLM's paged KV cache: its page layouts (`layout`, a leaf: gather and scatter of a request's
tokens, manager blocks as kernel blocks), a worker's caches bound once (`caches.PagedCaches`, with
frames decoded into a request's blocks) and a step's saves encoded from them layer by layer
(`encoding`; with the start-up warm-up), and an SSM hybrid's state layers (`states`)."""

from cachegen_vllm.paged.caches import PagedCaches
from cachegen_vllm.paged.encoding import EncodeStep, LayerEncode, SaveRange, encode, time_encode, warm_up
from cachegen_vllm.paged.layout import FP8_CACHE_DTYPES, PageOrder, gather, kernel_block_ids, probe_page_order, scatter
from cachegen_vllm.paged.states import StateLayers

__all__ = [
    "FP8_CACHE_DTYPES",
    "EncodeStep",
    "LayerEncode",
    "PageOrder",
    "PagedCaches",
    "SaveRange",
    "StateLayers",
    "encode",
    "gather",
    "kernel_block_ids",
    "probe_page_order",
    "scatter",
    "time_encode",
    "warm_up",
]

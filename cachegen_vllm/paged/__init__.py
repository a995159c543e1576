"""vLLM's paged KV cache: its page layouts (`layout`, a leaf: gather and scatter of a request's
tokens) and the codec on it (`codec`: `encode_blocks`, `decode_into_blocks`)."""

from cachegen_vllm.paged.codec import decode_into_blocks, encode_blocks
from cachegen_vllm.paged.layout import PageOrder, gather, probe_page_order, scatter

__all__ = ["PageOrder", "decode_into_blocks", "encode_blocks", "gather", "probe_page_order", "scatter"]

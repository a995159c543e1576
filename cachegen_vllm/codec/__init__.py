"""The codec: wire format, quantization, bit allocation, bit packing.

Public API (one for CPU and GPU tensors): `encode_layer` / `encode_chunk` produce frames,
`decode_chunk` reads one back (`decode_frames` several, their entropy-coded lanes in one pass),
`FrameError` is the one exception bad bytes raise.
"""

from cachegen_vllm.codec.allocation import Segment, chunk_bounds, plan_segments
from cachegen_vllm.codec.format import FrameError, KVGeometry, check_integrity, parse_frame
from cachegen_vllm.codec.reference import DecodedChunk, decode_chunk, decode_frames, encode_chunk, encode_layer

__all__ = [
    "DecodedChunk", "FrameError", "KVGeometry", "Segment", "check_integrity", "chunk_bounds", "decode_chunk", "decode_frames",
    "encode_chunk", "encode_layer", "parse_frame", "plan_segments",
]

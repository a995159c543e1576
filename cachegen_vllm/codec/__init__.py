"""The codec: pure functions of tensors and bytes, with no knowledge of vLLM, devices' kernels or
the network. Wire format (`format`), profiles (`profile`), bit allocation, quantization and bit
packing, entropy coding (`entropy`, `rans`), calibrated bases (`basis`), the reference codec.

Public API (one for CPU and GPU tensors): `encode_layer` / `encode_chunk` produce frames,
`decode_chunk` reads one back (`decode_frames` several, their entropy-coded lanes in one pass),
`FrameError` is the one exception bad bytes raise.
"""

from cachegen_vllm.codec.allocation import Segment, chunk_bounds, plan_segments
from cachegen_vllm.codec.format import Frame, FrameError, ParsedFrame, parse_frame, read_frame
from cachegen_vllm.codec.geometry import KV, KVGeometry
from cachegen_vllm.codec.profile import EXACT_BITS, ConfigError, Profile
from cachegen_vllm.codec.reference import DecodedChunk, decode_chunk, decode_frames, encode_chunk, encode_layer

__all__ = [
    "EXACT_BITS",
    "KV",
    "ConfigError",
    "DecodedChunk",
    "Frame",
    "FrameError",
    "KVGeometry",
    "ParsedFrame",
    "Profile",
    "Segment",
    "chunk_bounds",
    "decode_chunk",
    "decode_frames",
    "encode_chunk",
    "encode_layer",
    "parse_frame",
    "plan_segments",
    "read_frame",
]

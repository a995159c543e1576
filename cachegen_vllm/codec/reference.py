"""The reference codec in plain torch: runs on CPU and CUDA tensors, and is the oracle that every
kernel is tested against. It produces and reads exactly the bytes of docs/FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cachegen_vllm.codec.allocation import Segment, chunk_bounds, plan_segments
from cachegen_vllm.codec.bitpack import pack, unpack
from cachegen_vllm.codec.format import FrameHeader, KVGeometry, parse_frame, payload_arrays, write_frame
from cachegen_vllm.codec.quant import STAT_DTYPE, dequantize, hadamard_, quantize
from cachegen_vllm.config import EXACT_BITS, Profile


@dataclass(frozen=True)
class DecodedChunk:
    layer: int
    token_start: int
    key: torch.Tensor  # [tokens, kv_heads, head_dim], the geometry's dtype
    value: torch.Tensor


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def _encode_tensor(x: torch.Tensor, bits: int, axis: str, group_tokens: int, hadamard: bool):
    """Arrays of one tensor of one segment, or None if fp16 statistics cannot represent it."""
    if bits == EXACT_BITS:
        return [_to_bytes(x)]
    work = x.float().contiguous()  # a copy: the rotation works in place
    if hadamard:
        hadamard_(work)
    codes, mins, scales = quantize(work, bits, axis, group_tokens)
    if not (torch.isfinite(mins).all() and torch.isfinite(scales).all()):
        return None
    return [_to_bytes(mins), _to_bytes(scales), _to_bytes(pack(codes, bits))]


def encode_chunk(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int,
    segments: list[Segment],
) -> bytes:
    """One frame for tokens ``[token_start, token_start + len(key))`` of one layer.

    key, value: [tokens, kv_heads, head_dim] in ``geometry.dtype``. A segment whose range fp16
    statistics cannot hold (inf/nan or beyond +-65504) is sent exact rather than wrong.
    """
    expected = (sum(s.tokens for s in segments), geometry.num_kv_heads, geometry.head_dim)
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected or t.dtype != geometry.dtype:
            raise ValueError(f"{name} must be {list(expected)} {geometry.dtype}, got {list(t.shape)} {t.dtype}")
    hadamard = profile.rotation == "hadamard"
    arrays, final_segments, row = [], [], 0
    for seg in segments:
        k, v = key[row : row + seg.tokens], value[row : row + seg.tokens]
        row += seg.tokens
        k_arrays = _encode_tensor(k, seg.key_bits, "channel", profile.group_tokens, hadamard)
        v_arrays = _encode_tensor(v, seg.value_bits, profile.value_axis, profile.group_tokens, hadamard)
        if k_arrays is None:
            k_arrays = _encode_tensor(k, EXACT_BITS, "channel", 0, False)
        if v_arrays is None:
            v_arrays = _encode_tensor(v, EXACT_BITS, "channel", 0, False)
        key_bits = seg.key_bits if len(k_arrays) > 1 else EXACT_BITS
        value_bits = seg.value_bits if len(v_arrays) > 1 else EXACT_BITS
        final_segments.append(Segment(seg.tokens, key_bits, value_bits))
        arrays += k_arrays + v_arrays
    header = FrameHeader(layer, token_start, profile.group_tokens, profile.value_axis, hadamard, tuple(final_segments))
    return write_frame(header, geometry, arrays)


def encode_layer(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int = 0,
    total_tokens: int | None = None,
) -> list[bytes]:
    """Frames for a layer's tokens ``[token_start, token_start + len(key))``, one per chunk.

    ``total_tokens`` (default: the end of this range) is the request's prompt length, from which
    token distances for the recent-token bit tiers are counted.
    """
    total = token_start + key.shape[0] if total_tokens is None else total_tokens
    frames = []
    for start, count in chunk_bounds(profile, token_start, key.shape[0]):
        rows = slice(start - token_start, start - token_start + count)
        frames.append(
            encode_chunk(
                key[rows], value[rows], geometry=geometry, profile=profile, layer=layer, token_start=start,
                segments=plan_segments(profile, layer, start, count, total),
            )
        )
    return frames


def _decode_tensor(frame: torch.Tensor, arrays, tokens: int, bits: int, axis: str, header: FrameHeader, geometry: KVGeometry):
    shape = (tokens, geometry.num_kv_heads, geometry.head_dim)

    def array(i: int) -> torch.Tensor:
        offset, n = arrays[i]
        return frame[offset : offset + n]

    if bits == EXACT_BITS:
        return array(0).view(geometry.dtype).view(shape)
    mins, scales = array(0).view(STAT_DTYPE), array(1).view(STAT_DTYPE)
    codes = unpack(array(2), bits, tokens * geometry.channels)
    out = dequantize(codes, mins, scales, shape, axis, header.group_tokens)
    if header.hadamard:
        hadamard_(out)
    return out.to(geometry.dtype)


def decode_chunk(
    frame: bytes | bytearray | memoryview,
    geometry: KVGeometry,
    *,
    device: torch.device | str = "cpu",
    expect_layer: int | None = None,
    expect_token_start: int | None = None,
) -> DecodedChunk:
    """Decode one frame to K and V on ``device``. Raises FrameError on any bad byte."""
    header = parse_frame(frame, geometry, expect_layer, expect_token_start)
    data = torch.frombuffer(bytearray(frame), dtype=torch.uint8).to(device)
    keys, values = [], []
    for seg, arrays in zip(header.segments, payload_arrays(header, geometry)):
        n_key = 1 if seg.key_bits == EXACT_BITS else 3
        keys.append(_decode_tensor(data, arrays[:n_key], seg.tokens, seg.key_bits, "channel", header, geometry))
        values.append(_decode_tensor(data, arrays[n_key:], seg.tokens, seg.value_bits, header.value_axis, header, geometry))
    return DecodedChunk(header.layer, header.token_start, torch.cat(keys), torch.cat(values))

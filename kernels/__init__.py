"""Triton kernels (imported as ``cachegen_vllm.kernels``): encode frames straight from vLLM's paged
KV cache and decode them straight back into it.

The bytes are docs/FORMAT.md's, identical to the reference codec's (`cachegen_vllm.codec`), which
the tests check under ``TRITON_INTERPRET=1``. Callers normally use `cachegen_vllm.paged`, which
picks these kernels for CUDA tensors and the reference for CPU ones.

Each direction is three steps, so that a caller can put the device work on a stream of its own and
collect the result later: `plan_encode` (host: which tile goes where) -> `launch_encode` (device:
asynchronous) -> `finish_encode` (host: copy back, header and checksum); `decode_frames_paged`
does the same in one call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import triton

from cachegen_vllm.codec.allocation import chunk_bounds, plan_segments
from cachegen_vllm.codec.format import FrameHeader, KVGeometry, frame_nbytes, parse_frame, seal_frame
from cachegen_vllm.codec.reference import encode_chunk
from cachegen_vllm.codec.tiles import TILE_FIELDS, TILE_KEY_BITS, TILE_VALUE_BITS, frame_slots, frame_tiles
from cachegen_vllm.config import EXACT_BITS, Profile
from cachegen_vllm.kernels.paged_codec import decode_kernel, encode_kernel

# A tile (one statistics group of one head) lives in registers: 256 tokens x 128 channels of fp32
# is 128 KiB per tensor, the most 16 warps hold without spilling heavily.
MAX_GROUP_TOKENS = 256


def check_supported(geometry: KVGeometry, group_tokens: int) -> None:
    """Raise ValueError, naming the field, for what the kernels cannot encode or decode."""
    d = geometry.head_dim
    if d < 8 or d & (d - 1):
        raise ValueError(f"head_dim {d}: the kernels need a power of two >= 8 (the CPU path takes any)")
    if not 1 <= group_tokens <= MAX_GROUP_TOKENS:
        raise ValueError(f"group_tokens {group_tokens}: the kernels take 1..{MAX_GROUP_TOKENS}")


def kernel_constants(geometry: KVGeometry, group_tokens: int, value_axis: str, hadamard: bool) -> dict:
    """Compile-time arguments of both kernels, widths aside (one compiled variant per pair)."""
    check_supported(geometry, group_tokens)
    d, block_t = geometry.head_dim, triton.next_power_of_2(group_tokens)
    return dict(
        H=geometry.num_kv_heads, D=d, BLOCK_T=block_t, FIELDS=TILE_FIELDS, EXACT=EXACT_BITS,
        ITEM=geometry.dtype.itemsize, VALUE_PER_TOKEN=value_axis == "token", HADAMARD=hadamard,
        LOG2_D=d.bit_length() - 1, INV_SQRT_D=1.0 / math.sqrt(d),
        # ~32 fp32 values of a tile per thread: fewer warps spill (ptxas, NOTES.md)
        num_warps=min(16, max(4, block_t * d // 512)),
    )


def _layout(cache: torch.Tensor) -> tuple[int, ...]:
    """block_size and the element strides of (block, head, token, channel): from the tensor itself."""
    if cache.dim() != 4:
        raise ValueError(f"a layer's cache must be [num_blocks, num_kv_heads, block_size, 2 * head_size], got {list(cache.shape)}")
    return (cache.shape[2], *cache.stride())


def _buffer_views(buffer: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The frame buffer as bytes, float16 statistics and cache-dtype exact values."""
    return buffer, buffer.view(torch.float16), buffer.view(dtype)


def _frame_buffer(size: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(size, dtype=torch.uint8, device=device)  # the format's padding is zeros


def _by_widths(tiles: list[tuple[int, list[int]]], device) -> list[tuple[tuple[int, int], list[int], torch.Tensor]]:
    """(frame, tile) pairs grouped by (key bits, value bits), one launch and one compiled kernel
    per pair: ((key bits, value bits), the frame of each tile, the tiles as a device tensor)."""
    groups: dict[tuple[int, int], list] = {}
    for frame, tile in tiles:
        groups.setdefault((tile[TILE_KEY_BITS], tile[TILE_VALUE_BITS]), []).append((frame, tile))
    return [
        (widths, [f for f, _ in members], torch.tensor([t for _, t in members], dtype=torch.int64).to(device))
        for widths, members in groups.items()
    ]


@dataclass
class EncodePlan:
    """One layer's frames: their headers, where each lies in ``buffer``, and the kernels' work."""

    headers: list[FrameHeader]
    bases: list[int]
    buffer: torch.Tensor  # uint8 on the device: the frames' bytes, back to back
    launches: list[tuple[tuple[int, int], list[int], torch.Tensor]]
    bad: list[torch.Tensor]  # per launch, [tiles, heads]: non-finite counts, filled by the kernel
    constants: dict


def plan_encode(
    geometry: KVGeometry, profile: Profile, *, layer: int, token_start: int, count: int, total_tokens: int,
    device: torch.device,
) -> EncodePlan:
    """The frames `codec.encode_layer` makes of tokens ``[token_start, token_start + count)``."""
    if profile.coding != "packed":
        raise ValueError(f"coding {profile.coding!r}: the kernels code 'packed' frames (paged.encode_blocks routes the rest)")
    headers, bases, size, launches = _encode_layout(geometry, profile, layer, token_start, count, total_tokens, device)
    return EncodePlan(
        [dataclasses.replace(h, layer=layer) for h in headers], bases, _frame_buffer(size, device), launches,
        [torch.empty(len(frames), geometry.num_kv_heads, dtype=torch.int32, device=device) for _, frames, _ in launches],
        kernel_constants(geometry, profile.group_tokens, profile.value_axis, profile.rotation == "hadamard"),
    )


_LAYOUTS: dict[tuple, tuple] = {}


def _encode_layout(geometry: KVGeometry, profile: Profile, layer: int, token_start: int, count: int, total_tokens: int, device):
    """Headers (for any layer), frame offsets, buffer size and tiles on the device. Every layer with
    the same widths has the same layout: made once per save step instead of once per layer (a few
    ms each at long prompts, on the forward pass's path)."""
    key = (geometry, profile, profile.layer_bits(layer), token_start, count, total_tokens, str(device))
    if key not in _LAYOUTS:
        hadamard = profile.rotation == "hadamard"
        headers = [
            FrameHeader(layer, start, profile.group_tokens, profile.value_axis, hadamard,
                        tuple(plan_segments(profile, layer, start, n, total_tokens)))
            for start, n in chunk_bounds(profile, token_start, count)
        ]
        bases, size = frame_slots(headers, geometry)
        tiles = [(i, t) for i, (header, base) in enumerate(zip(headers, bases)) for t in frame_tiles(header, geometry, base)]
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = (headers, bases, size, _by_widths(tiles, device))
    return _LAYOUTS[key]


def launch_encode(plan: EncodePlan, cache: torch.Tensor, block_table: torch.Tensor, geometry: KVGeometry) -> None:
    """Enqueue the encode kernels on the current stream: reads the request's blocks of ``cache``
    (``block_table``: its block ids in order, on the cache's device), writes ``plan.buffer``."""
    for ((key_bits, value_bits), frames, tiles), bad in zip(plan.launches, plan.bad):
        encode_kernel[(len(frames), geometry.num_kv_heads)](
            cache, block_table, tiles, *_buffer_views(plan.buffer, geometry.dtype), bad, *_layout(cache),
            KEY_BITS=key_bits, VALUE_BITS=value_bits, **plan.constants,
        )


def finish_encode(plan: EncodePlan, cache: torch.Tensor, block_table: torch.Tensor, geometry: KVGeometry, profile: Profile) -> list[bytes | memoryview]:
    """Wait for the kernels and seal the frames, in place in one host copy of the buffer: the
    frames are views of it (copying them into bytes objects cost 8x the checksums at long
    prompts, NOTES.md). A frame with values its float16 statistics cannot hold (inf, nan, beyond
    +-65504) is made by the reference, which sends such tensors exact."""
    payload = memoryview(plan.buffer.cpu().numpy())
    refused = {f for (_, frames, _), bad in zip(plan.launches, plan.bad) for f, n in zip(frames, bad.sum(dim=1).tolist()) if n}
    out = []
    for i, (header, base) in enumerate(zip(plan.headers, plan.bases)):
        if i in refused:
            out.append(_reference_frame(cache, block_table, header, geometry, profile))
            continue
        frame = payload[base : base + frame_nbytes(header, geometry)]
        seal_frame(header, geometry, frame)
        out.append(frame)
    return out


def _reference_frame(cache, block_table, header: FrameHeader, geometry: KVGeometry, profile: Profile) -> bytes:
    from cachegen_vllm.paged import gather  # which imports this module to dispatch

    key, value = gather(cache, None, block_table, header.token_start + header.token_count)
    rows = slice(header.token_start, None)
    return encode_chunk(
        key[rows].cpu(), value[rows].cpu(), geometry=geometry, profile=profile, layer=header.layer,
        token_start=header.token_start, segments=list(header.segments),
    )


def encode_layer_paged(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int,
    count: int,
    total_tokens: int,
) -> list[bytes | memoryview]:
    """`codec.encode_layer` of tokens ``[token_start, token_start + count)`` of one layer, read from
    the request's blocks, byte for byte."""
    plan = plan_encode(geometry, profile, layer=layer, token_start=token_start, count=count,
                       total_tokens=total_tokens, device=cache.device)
    launch_encode(plan, cache, block_table, geometry)
    return finish_encode(plan, cache, block_table, geometry, profile)


@dataclass
class DecodePlan:
    headers: list[FrameHeader]
    launches: list[tuple[int, torch.Tensor, list, dict]]  # (layer, buffer, width groups, constants)


def plan_decode(frames: list[bytes | bytearray | memoryview], geometry: KVGeometry, device: torch.device) -> DecodePlan:
    """Validate frames (`FrameError` on any bad byte, before anything is written) and copy them to
    the device, grouped by layer and format flags."""
    headers = [parse_frame(frame, geometry) for frame in frames]
    if any(h.coding != "packed" for h in headers):
        raise ValueError("the kernels decode 'packed' frames only (paged.decode_into_blocks routes the rest)")
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(headers):
        groups.setdefault((h.layer, h.group_tokens, h.value_axis, h.hadamard), []).append(i)
    launches = []
    for (layer, group_tokens, value_axis, hadamard), members in groups.items():
        bases, size = frame_slots([headers[i] for i in members], geometry)
        host = torch.zeros(size, dtype=torch.uint8, pin_memory=torch.device(device).type == "cuda")
        staging = host.numpy()  # one copy of each frame, straight from its (read-only) bytes
        for i, base in zip(members, bases):
            staging[base : base + len(frames[i])] = np.frombuffer(frames[i], dtype=np.uint8)
        tiles = [(i, t) for i, base in zip(members, bases) for t in frame_tiles(headers[i], geometry, base)]
        launches.append((layer, host.to(device, non_blocking=True), _by_widths(tiles, device),
                         kernel_constants(geometry, group_tokens, value_axis, hadamard)))
    return DecodePlan(headers, launches)


def launch_decode(
    plan: DecodePlan, caches: Mapping[int, torch.Tensor], block_table: torch.Tensor, geometry: KVGeometry,
    write_start: int = 0, write_end: int = 1 << 62,
) -> None:
    """Enqueue the decode kernels: tokens ``[write_start, write_end)`` of each frame go into the
    request's blocks of ``caches[layer]``; nothing else is written."""
    for layer, buffer, groups, constants in plan.launches:
        cache = caches[layer]
        for (key_bits, value_bits), frames, tiles in groups:
            decode_kernel[(len(frames), geometry.num_kv_heads)](
                cache, block_table, tiles, *_buffer_views(buffer, geometry.dtype), write_start, write_end,
                *_layout(cache), KEY_BITS=key_bits, VALUE_BITS=value_bits, **constants,
            )


def decode_frames_paged(
    frames: list[bytes | bytearray | memoryview],
    caches: Mapping[int, torch.Tensor],
    block_table: torch.Tensor,
    *,
    geometry: KVGeometry,
    write_start: int = 0,
    write_end: int = 1 << 62,
) -> list[FrameHeader]:
    """Validate and decode frames into the request's blocks; returns their headers."""
    device = next(iter(caches.values())).device
    plan = plan_decode(frames, geometry, device)
    launch_decode(plan, caches, block_table, geometry, write_start, write_end)
    return plan.headers

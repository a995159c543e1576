"""The kernels' host side: which tile of which frame goes where, launches, and sealing.

Each direction is three steps, so that a caller can put the device work on a stream of its own and
collect the result later: `plan_encode` (host: the frames' headers and tiles) -> `launch_encode`
(device, asynchronous) -> `finish_encode` (host: copy back, header and checksum);
`decode_frames_paged` does the same for decoding in one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from cachegen_vllm.codec.allocation import chunk_bounds, covering_token_counts, plan_segments
from cachegen_vllm.codec.format import FrameHeader, ParsedFrame, frame_nbytes, seal_frame
from cachegen_vllm.codec.geometry import KV, KVGeometry
from cachegen_vllm.codec.profile import Profile
from cachegen_vllm.device import Runtime
from cachegen_vllm.kernels.tile_kernels import decode_tiles, encode_tiles, kernel_constants
from cachegen_vllm.kernels.tiles import TensorField, frame_slots, frame_tiles, tensor_column

# Tiles grouped by (key bits, value bits), one launch and one compiled kernel each: the widths,
# the frame of each tile, and the tiles on the device.
Launch = tuple[tuple[int, int], list[int], torch.Tensor]

_WIDTHS = (tensor_column(KV.KEY, TensorField.BITS), tensor_column(KV.VALUE, TensorField.BITS))


def _by_widths(tiles: list[tuple[int, list[int]]], runtime: Runtime) -> list[Launch]:
    groups: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    for frame, tile in tiles:
        groups.setdefault((tile[_WIDTHS[0]], tile[_WIDTHS[1]]), []).append((frame, tile))
    return [
        (widths, [f for f, _ in members], runtime.to_device(np.array([t for _, t in members], dtype=np.int64)))
        for widths, members in groups.items()
    ]


@dataclass
class EncodePlan:
    """One layer's frames: their headers, where each lies in ``buffer``, and the kernels' work."""

    headers: list[FrameHeader]
    bases: list[int]
    buffer: torch.Tensor  # uint8 on the device: the frames' bytes, back to back
    launches: list[Launch]
    bad: list[torch.Tensor]  # per launch, [tiles, heads]: non-finite counts, filled by the kernel
    constants: dict


def plan_encode(
    geometry: KVGeometry,
    profile: Profile,
    *,
    layer: int,
    token_start: int,
    count: int,
    total_tokens: int,
    device: torch.device,
    runtime: Runtime | None = None,
) -> EncodePlan:
    """The frames `codec.encode_layer` makes of tokens ``[token_start, token_start + count)``; device
    work on the current stream (``runtime``: how host arrays get there; default plain copies)."""
    if profile.coding != "packed":
        raise ValueError(
            f"coding {profile.coding!r}: the kernels code 'packed' frames (PagedCaches.start_encode routes the rest)"
        )
    headers, bases, size, launches = _encode_layout(
        geometry, profile, layer, token_start, count, total_tokens, device, runtime or Runtime(device)
    )
    return EncodePlan(
        [dataclasses.replace(h, layer=layer) for h in headers],
        bases,
        _frame_buffer(size, device),
        launches,
        [
            torch.empty(len(frames), geometry.num_kv_heads, dtype=torch.int32, device=device)
            for _, frames, _ in launches
        ],
        kernel_constants(geometry, profile.group_tokens, profile.value_axis, profile.rotation == "hadamard"),
    )


def _frame_buffer(size: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(size, dtype=torch.uint8, device=device)  # the format's padding is zeros


_LAYOUTS: dict[tuple, tuple[list[FrameHeader], list[int], int, list[Launch]]] = {}


def _encode_layout(
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int,
    count: int,
    total_tokens: int,
    device: torch.device,
    runtime: Runtime,
) -> tuple[list[FrameHeader], list[int], int, list[Launch]]:
    """Headers (for any layer), frame offsets, buffer size and tiles on the device. Every layer with
    the same widths has the same layout: made once per save step instead of once per layer, off
    the forward pass's path."""
    key = (geometry, profile, profile.layer_bits(layer), token_start, count, total_tokens, str(device))
    if key not in _LAYOUTS:
        hadamard = profile.rotation == "hadamard"
        headers = [
            FrameHeader(
                layer,
                start,
                profile.group_tokens,
                profile.value_axis,
                hadamard,
                tuple(plan_segments(profile, layer, start, n, total_tokens)),
            )
            for start, n in chunk_bounds(profile, token_start, count)
        ]
        bases, size = frame_slots(headers, geometry)
        tiles = [
            (i, t) for i, (header, base) in enumerate(zip(headers, bases)) for t in frame_tiles(header, geometry, base)
        ]
        if len(_LAYOUTS) >= 64:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = (headers, bases, size, _by_widths(tiles, runtime))
    return _LAYOUTS[key]


def profile_variants(geometry: KVGeometry, profile: Profile) -> list[tuple[int, int]]:
    """The (key bits, value bits) of every kernel variant that requests of ``profile`` launch: one
    compiled kernel per pair and direction."""
    widths = set()
    layers = {profile.layer_bits(layer): layer for layer in range(geometry.num_layers)}.values()
    for layer in layers:
        for total in covering_token_counts(profile):
            for segment in plan_segments(profile, layer, 0, total, total):
                widths.add((segment.key_bits, segment.value_bits))
    return sorted(widths)


def launch_encode(plan: EncodePlan, cache: torch.Tensor, block_table: torch.Tensor) -> None:
    """Enqueue the encode kernels on the current stream: reads the request's blocks of ``cache``
    (``block_table``: its block ids in order, on the cache's device), writes ``plan.buffer``."""
    for ((key_bits, value_bits), _, tiles), bad in zip(plan.launches, plan.bad):
        encode_tiles(cache, block_table, tiles, plan.buffer, bad, key_bits, value_bits, plan.constants)


def finish_encode(
    plan: EncodePlan,
    geometry: KVGeometry,
    payload: torch.Tensor | None = None,
    bad: list[torch.Tensor] | None = None,
) -> list[memoryview | None]:
    """Seal the frames in place in a host copy of the buffer: the frames are views of it (no copy
    per frame). ``payload`` and ``bad``: host copies of ``plan.buffer`` and ``plan.bad`` whose copies
    are complete (default: copied here, which waits for the kernels). None stands for a frame with
    values its float16 statistics cannot hold (inf, nan, beyond +-65504): the caller makes it the
    reference's way, which sends such tensors exact."""
    data = (plan.buffer if payload is None else payload).cpu().numpy().data
    counts = [b.cpu() for b in (plan.bad if bad is None else bad)]
    refused = {
        f for (_, frames, _), n in zip(plan.launches, counts) for f, c in zip(frames, n.sum(dim=1).tolist()) if c
    }
    out: list[memoryview | None] = []
    for i, (header, base) in enumerate(zip(plan.headers, plan.bases)):
        if i in refused:
            out.append(None)
            continue
        frame = data[base : base + frame_nbytes(header, geometry)]
        seal_frame(header, geometry, frame)
        out.append(frame)
    return out


@dataclass
class DecodePlan:
    headers: list[FrameHeader]
    launches: list[tuple[int, torch.Tensor, list[Launch], dict]]  # (layer, buffer, width groups, constants)


def plan_decode(
    frames: list[ParsedFrame], geometry: KVGeometry, device: torch.device, runtime: Runtime | None = None
) -> DecodePlan:
    """Check frames read where they entered against the model (`FrameError` before anything is
    written) and copy them to the device, grouped by layer and format flags, on the current stream
    (``runtime``: how)."""
    for frame in frames:
        frame.check(geometry)
    headers = [frame.header for frame in frames]
    if any(h.coding != "packed" for h in headers):
        raise ValueError("the kernels decode 'packed' frames only (PagedCaches.decode routes the rest)")
    if any((h.head_start, h.head_count) != (geometry.head_start, geometry.num_kv_heads) for h in headers):
        raise ValueError("the kernels decode frames of the cache's own heads only (PagedCaches.decode routes the rest)")
    runtime = runtime or Runtime(device)
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(headers):
        groups.setdefault((h.layer, h.group_tokens, h.value_axis, h.hadamard), []).append(i)
    launches = []
    for (layer, group_tokens, value_axis, hadamard), members in groups.items():
        bases, size = frame_slots([headers[i] for i in members], geometry)
        buffer = runtime.stage([(base, frames[i].data) for i, base in zip(members, bases)], size)
        tiles = [(i, t) for i, base in zip(members, bases) for t in frame_tiles(headers[i], geometry, base)]
        launches.append(
            (
                layer,
                buffer,
                _by_widths(tiles, runtime),
                kernel_constants(geometry, group_tokens, value_axis, hadamard),
            )
        )
    return DecodePlan(headers, launches)


def launch_decode(
    plan: DecodePlan,
    caches: Mapping[int, torch.Tensor],
    block_table: torch.Tensor,
    write_start: int = 0,
    write_end: int = 1 << 62,
) -> None:
    """Enqueue the decode kernels: tokens ``[write_start, write_end)`` of each frame go into the
    request's blocks of ``caches[layer]``; nothing else is written."""
    for layer, buffer, groups, constants in plan.launches:
        for (key_bits, value_bits), _, tiles in groups:
            decode_tiles(
                caches[layer], block_table, tiles, buffer, write_start, write_end, key_bits, value_bits, constants
            )


def decode_frames_paged(
    frames: list[ParsedFrame],
    caches: Mapping[int, torch.Tensor],
    block_table: torch.Tensor,
    *,
    geometry: KVGeometry,
    write_start: int = 0,
    write_end: int = 1 << 62,
    runtime: Runtime | None = None,
) -> list[FrameHeader]:
    """Check and decode frames into the request's blocks, on the current stream; returns their
    headers. ``runtime``: how frames reach the device (default: plain copies)."""
    device = next(iter(caches.values())).device
    plan = plan_decode(frames, geometry, device, runtime)
    launch_decode(plan, caches, block_table, write_start, write_end)
    return plan.headers

"""The kernels' host side: which tile of which frame goes where, launches, and sealing.

Each direction is three steps, so that a caller can put the device work on a stream of its own and
collect the result later: `plan_encode` (host: the frames' headers and tiles, once per step for
all its saves) -> `launch_encode` (device, asynchronous: one launch per pair of widths per layer,
whatever the number of saves) -> `finish_encode` (host, from a copy of the buffer: header and
checksum); `decode_frames_paged` does the same for decoding in one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
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


@dataclass(frozen=True)
class SaveSpan:
    """Tokens ``[start, end)`` of a prompt of ``total`` tokens, read through the step's block table
    from entry ``table`` on (the request's first block)."""

    table: int
    start: int
    end: int
    total: int


@dataclass
class EncodePlan:
    """One layer's frames of a step's saves, back to back in one buffer: their headers (of the
    layer planned; `finish_encode` names the layer sealed), where each lies, which save each
    belongs to, and the kernels' work. Each launch's non-finite counts ([tiles, heads] int32) follow
    the frames in the same buffer, so that one copy brings everything to the host."""

    headers: list[FrameHeader]
    bases: list[int]
    saves: list[range]  # per save: the indices of its frames
    launches: list[Launch]
    counts_at: list[int]  # per launch: the byte offset of its non-finite counts
    nbytes: int
    constants: dict


def plan_encode(
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    saves: Sequence[SaveSpan],
    device: torch.device,
    runtime: Runtime | None = None,
) -> EncodePlan:
    """The frames `codec.encode_layer` makes of each save's tokens, for ``layer`` and every layer of
    the same widths; the tiles go to the device on the current stream (``runtime``: how host arrays
    get there; default plain copies). Made once per step and widths, not per layer."""
    if profile.coding != "packed":
        raise ValueError(
            f"coding {profile.coding!r}: the kernels code 'packed' frames (paged.EncodeStep routes the rest)"
        )
    hadamard = profile.rotation == "hadamard"
    headers: list[FrameHeader] = []
    tables: list[int] = []  # each frame's request's entry in the step's block table
    spans: list[range] = []
    for save in saves:
        first = len(headers)
        for start, n in chunk_bounds(profile, save.start, save.end - save.start):
            segments = tuple(plan_segments(profile, layer, start, n, save.total))
            headers.append(FrameHeader(layer, start, profile.group_tokens, profile.value_axis, hadamard, segments))
            tables.append(save.table)
        spans.append(range(first, len(headers)))
    bases, size = frame_slots(headers, geometry)
    tiles = [
        (i, t)
        for i, (header, base, table) in enumerate(zip(headers, bases, tables))
        for t in frame_tiles(header, geometry, base, table)
    ]
    launches = _by_widths(tiles, runtime or Runtime(device))
    counts_at, nbytes = [], size
    for _, frames, _ in launches:
        counts_at.append(nbytes)
        nbytes += len(frames) * geometry.num_kv_heads * 4
    return EncodePlan(
        headers,
        bases,
        spans,
        launches,
        counts_at,
        nbytes,
        kernel_constants(geometry, profile.group_tokens, profile.value_axis, hadamard),
    )


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


def _counts(plan: EncodePlan, buffer: torch.Tensor, launch: int) -> torch.Tensor:
    """Launch ``launch``'s non-finite counts [tiles, heads] in ``buffer`` (the device's or a host copy)."""
    at, tiles = plan.counts_at[launch], len(plan.launches[launch][1])
    return buffer[at : at + tiles * plan.constants["H"] * 4].view(torch.int32).view(tiles, -1)


def launch_encode(plan: EncodePlan, cache: torch.Tensor, block_table: torch.Tensor, buffer: torch.Tensor) -> None:
    """Enqueue the encode kernels on the current stream: read the saves' blocks of ``cache``
    (``block_table``: the step's, each save's block ids in order from its entry), write the frames
    and counts into ``buffer`` (uint8 zeros of at least ``plan.nbytes``: the format's padding is
    zeros)."""
    for i, ((key_bits, value_bits), _, tiles) in enumerate(plan.launches):
        encode_tiles(cache, block_table, tiles, buffer, _counts(plan, buffer, i), key_bits, value_bits, plan.constants)


def finish_encode(
    plan: EncodePlan, geometry: KVGeometry, layer: int, host: torch.Tensor
) -> list[list[memoryview | None]]:
    """Seal, in place in ``host`` (a complete host copy of the buffer's first ``plan.nbytes``), the
    frames of ``layer``: each save's, views of ``host`` (no copy per frame). None stands for a
    frame with values its float16 statistics cannot hold (inf, nan, beyond +-65504): the caller
    makes it the reference's way, which sends such tensors exact."""
    data = host.numpy().data
    refused = {
        f
        for i, (_, frames, _) in enumerate(plan.launches)
        for f, c in zip(frames, _counts(plan, host, i).sum(dim=1).tolist())
        if c
    }
    out: list[list[memoryview | None]] = []
    for span in plan.saves:
        frames: list[memoryview | None] = []
        for i in span:
            if i in refused:
                frames.append(None)
                continue
            header = dataclasses.replace(plan.headers[i], layer=layer)
            frame = data[plan.bases[i] : plan.bases[i] + frame_nbytes(header, geometry)]
            seal_frame(header, geometry, frame)
            frames.append(frame)
        out.append(frames)
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

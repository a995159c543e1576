"""Frames as kernel work: where each tile of tokens reads and writes its bytes.

A *tile* is one statistics group of one segment: up to ``group_tokens`` consecutive tokens (groups
start at the segment's first token, as the format's per-channel statistics do). A kernel program
handles one tile of one KV head, for K and for V, so every array of docs/FORMAT.md is written by
independent programs with no reduction across them. Offsets are bytes into one buffer that holds
frames back to back, each starting at a multiple of `ALIGN`; the header, segment table and checksum
around each payload are the host's (`format.seal_frame`).

A tile is a row of `TILE_FIELDS` int64, its columns named by `Tile`: the first token and the token
count, then a `TensorField` block for K and one for V, then where the request's blocks start in
the block table (one launch serves every request of a step). ``CODES`` is the offset of the tile's first
packed code (or, for exact tensors, its first value in the cache's dtype); ``MINS`` / ``SCALES``
that of its first statistic (0 for exact tensors). Within the tile the kernel adds ``(t * heads +
head) * head_dim * bits / 8`` to the codes, ``head * head_dim + channel`` (per-channel) or ``t *
heads + head`` (per-token) to the statistics' element index.
"""

from __future__ import annotations

import enum

from cachegen_vllm.codec.format import ALIGN, FrameHeader, frame_nbytes, payload_arrays
from cachegen_vllm.codec.geometry import KV, KVGeometry
from cachegen_vllm.codec.profile import EXACT_BITS
from cachegen_vllm.codec.quant import STAT_DTYPE


class TensorField(enum.IntEnum):
    """Columns of one tensor's block in a tile row, from the block's first column."""

    BITS = 0
    CODES = 1
    MINS = 2
    SCALES = 3


class Tile(enum.IntEnum):
    """Columns of a tile row: where each block starts."""

    TOKEN = 0  # the tile's first token, a position in the request
    TOKENS = 1  # how many tokens it holds
    KEY = 2  # K's TensorField block
    VALUE = KEY + len(TensorField)  # V's
    TABLE = VALUE + len(TensorField)  # the entry of the block table where the request's blocks start


TILE_FIELDS = Tile.TABLE + 1


def tensor_column(tensor: KV, field: TensorField) -> int:
    return (Tile.KEY if tensor == KV.KEY else Tile.VALUE) + field


def frame_slots(headers: list[FrameHeader], geometry: KVGeometry) -> tuple[list[int], int]:
    """Offsets of frames laid back to back in one buffer, and the buffer's size."""
    bases, offset = [], 0
    for header in headers:
        bases.append(offset)
        offset += -(-frame_nbytes(header, geometry) // ALIGN) * ALIGN
    return bases, offset


def frame_tiles(header: FrameHeader, geometry: KVGeometry, base: int, table: int = 0) -> list[list[int]]:
    """The tiles of one frame whose first byte is at ``base`` of the buffer, of a request whose
    blocks start at entry ``table`` of the block table."""
    channels, heads = geometry.channels, geometry.num_kv_heads
    group = header.group_tokens
    tiles, token = [], header.token_start
    for seg, arrays in zip(header.segments, payload_arrays(header, geometry)):
        key_arrays = 1 if seg.key_bits == EXACT_BITS else 3
        slots = {KV.KEY: arrays[:key_arrays], KV.VALUE: arrays[key_arrays:]}
        for first in range(0, seg.tokens, group):
            row = [token + first, min(group, seg.tokens - first)]
            for tensor in KV:
                bits = seg.bits(tensor)
                if bits == EXACT_BITS:
                    row += [bits, base + slots[tensor][0][0] + first * channels * geometry.dtype.itemsize, 0, 0]
                    continue
                stat = (first // group) * channels if header.axis(tensor) == "channel" else first * heads
                (mins, _), (scales, _), (codes, _) = slots[tensor]
                row += [
                    bits,
                    base + codes + first * channels * bits // 8,
                    base + mins + stat * STAT_DTYPE.itemsize,
                    base + scales + stat * STAT_DTYPE.itemsize,
                ]
            tiles.append([*row, table])
        token += seg.tokens
    return tiles

"""Frames as kernel work: where each tile of tokens reads and writes its bytes.

A *tile* is one statistics group of one segment: up to ``group_tokens`` consecutive tokens (groups
start at the segment's first token, as the format's per-channel statistics do). A kernel program
handles one tile of one KV head, for K and for V, so every array of docs/FORMAT.md is written by
independent programs with no reduction across them. Offsets are bytes into one buffer that holds
frames back to back, each starting at a multiple of `ALIGN`; the header, segment table and checksum
around each payload are the host's (`format.seal_frame`).

A tile is a row of `TILE_FIELDS` int64:
``token, tokens, key_bits, key_codes, key_mins, key_scales, value_bits, value_codes, value_mins,
value_scales``. ``*_codes`` is the offset of the tile's first packed code (or, for exact tensors,
its first value in the cache's dtype); ``*_mins`` / ``*_scales`` that of its first statistic
(0 for exact tensors). Within the tile the kernel adds ``(t * heads + head) * head_dim * bits / 8``
to the codes, ``head * head_dim + channel`` (per-channel) or ``t * heads + head`` (per-token) to
the statistics' element index.
"""

from __future__ import annotations

from cachegen_vllm.codec.format import ALIGN, FrameHeader, KVGeometry, frame_nbytes, payload_arrays
from cachegen_vllm.codec.quant import STAT_DTYPE
from cachegen_vllm.config import EXACT_BITS

TILE_FIELDS = 10
TILE_KEY_BITS, TILE_VALUE_BITS = 2, 6  # columns of the widths


def frame_slots(headers: list[FrameHeader], geometry: KVGeometry) -> tuple[list[int], int]:
    """Offsets of frames laid back to back in one buffer, and the buffer's size."""
    bases, offset = [], 0
    for header in headers:
        bases.append(offset)
        offset += -(-frame_nbytes(header, geometry) // ALIGN) * ALIGN
    return bases, offset


def frame_tiles(header: FrameHeader, geometry: KVGeometry, base: int) -> list[list[int]]:
    """The tiles of one frame whose first byte is at ``base`` of the buffer."""
    channels, heads = geometry.channels, geometry.num_kv_heads
    group = header.group_tokens
    tiles, token = [], header.token_start
    for seg, arrays in zip(header.segments, payload_arrays(header, geometry)):
        key_arrays = 1 if seg.key_bits == EXACT_BITS else 3
        tensors = (
            (seg.key_bits, "channel", arrays[:key_arrays]),
            (seg.value_bits, header.value_axis, arrays[key_arrays:]),
        )
        for first in range(0, seg.tokens, group):
            row = [token + first, min(group, seg.tokens - first)]
            for bits, axis, slots in tensors:
                if bits == EXACT_BITS:
                    row += [bits, base + slots[0][0] + first * channels * geometry.dtype.itemsize, 0, 0]
                    continue
                stat = (first // group) * channels if axis == "channel" else first * heads
                (mins, _), (scales, _), (codes, _) = slots
                row += [
                    bits, base + codes + first * channels * bits // 8,
                    base + mins + stat * STAT_DTYPE.itemsize, base + scales + stat * STAT_DTYPE.itemsize,
                ]
            tiles.append(row)
        token += seg.tokens
    return tiles

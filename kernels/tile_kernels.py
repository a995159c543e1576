"""Quantize + pack straight out of vLLM's paged KV cache, and unpack + dequantize straight back in.

One program per (tile, KV head) (`kernels.tiles`), one launch per (key bits, value bits) pair of
the tiles (a layer has a few: sink, body, recent tokens), so that the widths are compile-time
constants: 8 codes of b bits are one b-byte word, stored as one uint8/16/32 for b = 1, 2, 4, the
codes themselves for b = 8, and byte by byte only for b = 3, 5, 6, 7. Each program loads the
tile's K rows from the request's pages, rotates, takes the statistics, quantizes and packs, writing
the frame's arrays in place; then the same for V. Each cache byte is read once and each payload
byte written once: the group's statistics are taken over the tile while it sits in registers, so
there is no second pass, and no gathered copy of the request's KV is ever made. Decoding is the
mirror image.

The arithmetic repeats `codec.quant` operation for operation in fp32 (butterflies in the same order,
IEEE division via `div_rn`, round-to-nearest casts), so the codes are the reference's byte for byte.
That holds only while the compiler keeps those operations apart: left to itself, it fuses the
Hadamard scale and the subtraction of the minimum into one `fma.rn.f32` on a GPU (Triton's
interpreter never fuses), so both kernels are compiled with fusion off (`kernel_constants`), and
tests/test_kernels.py fails on an fma in their sm_90a PTX. Pages are addressed through the cache tensor's
own strides (any `KVCacheLayout`: the 4-D view ``[num_blocks, num_kv_heads, block_size, 2 *
head_size]`` with K then V on the last dimension, whatever its physical order) and the request's
block table.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cachegen_vllm.codec.geometry import KVGeometry
from cachegen_vllm.codec.profile import EXACT_BITS
from cachegen_vllm.kernels.tiles import TILE_FIELDS, TensorField, Tile

# A tile (one statistics group of one head) lives in registers: 256 tokens x 128 channels of fp32
# is 128 KiB per tensor, the most 16 warps hold without spilling heavily.
MAX_GROUP_TOKENS = 256

# The tile row's columns (kernels/tiles.py) as compile-time constants of the kernels.
TOKEN = tl.constexpr(Tile.TOKEN)
TOKENS = tl.constexpr(Tile.TOKENS)
KEY = tl.constexpr(Tile.KEY)
VALUE = tl.constexpr(Tile.VALUE)
TABLE = tl.constexpr(Tile.TABLE)
CODES = tl.constexpr(TensorField.CODES)
MINS = tl.constexpr(TensorField.MINS)
SCALES = tl.constexpr(TensorField.SCALES)


@triton.jit
def _hadamard(x, BLOCK_T: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """`codec.quant.hadamard_` on each row of a [BLOCK_T, D] fp32 tile: the same adds in the same
    order, so the result is bit-identical."""
    for s in tl.static_range(LOG2_D):  # pairs (i, i + 2**s) within runs of 2**(s+1) channels
        pairs = tl.permute(tl.reshape(x, [BLOCK_T, D >> (s + 1), 2, 1 << s]), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [BLOCK_T, D])
    return x * INV_SQRT_D


@triton.jit
def _fp16_step(x, up: tl.constexpr):
    """The float16 next to ``x`` towards +inf (``up``) or -inf, for finite x: `torch.nextafter`."""
    bits = x.to(tl.int16, bitcast=True)
    positive = x > 0
    zero = x == 0
    if up:
        stepped = tl.where(zero, 1, tl.where(positive, bits + 1, bits - 1))
    else:
        stepped = tl.where(zero, -32767, tl.where(positive, bits - 1, bits + 1))  # -32767: 0x8001, -2**-24
    return stepped.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 to the cache's dtype, to nearest even. Spelled out for bfloat16, where Triton's
    interpreter truncates (the GPU rounds): the tests then check what the GPU does. Finite x only,
    which is all decoding makes."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _pack_store(codes, base, t, h, tmask, H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BITS: tl.constexpr):
    """Store int32 codes [BLOCK_T, D] (each < 2**BITS) of rows (t, h) at byte pointer ``base``, in
    the format's order: row (t, h) starts at byte (t * H + h) * D * BITS / 8, and every 8 codes
    form one little-endian word of BITS bytes."""
    row = (t * H + h) * (D // 8 * BITS)
    if BITS == 8:
        tl.store(base + row[:, None] + tl.arange(0, D)[None, :], codes.to(tl.uint8), mask=tmask[:, None])
    else:
        WORD: tl.constexpr = tl.uint32 if BITS <= 4 else tl.uint64  # holds 8 codes
        lane = tl.arange(0, 8)
        words = tl.sum(
            tl.reshape(codes, [BLOCK_T, D // 8, 8]).to(WORD) << (lane * BITS).to(WORD)[None, None, :], axis=2
        )
        at = base + row[:, None] + (tl.arange(0, D // 8) * BITS)[None, :]
        if BITS == 1:
            tl.store(at, words.to(tl.uint8), mask=tmask[:, None])
        elif BITS == 2:
            tl.store(at.to(tl.pointer_type(tl.uint16)), words.to(tl.uint16), mask=tmask[:, None])
        elif BITS == 4:
            tl.store(at.to(tl.pointer_type(tl.uint32)), words, mask=tmask[:, None])
        else:  # 3, 5, 6, 7 bytes per word: byte by byte
            LANES: tl.constexpr = 4 if BITS == 3 else 8
            k = tl.arange(0, LANES)
            data = (words[:, :, None] >> (k * 8).to(WORD)[None, None, :]) & 0xFF
            tl.store(
                at[:, :, None] + k[None, None, :],
                data.to(tl.uint8),
                mask=tmask[:, None, None] & (k < BITS)[None, None, :],
            )


@triton.jit
def _load_unpack(base, t, h, tmask, H: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BITS: tl.constexpr):
    """Inverse of `_pack_store`: int32 codes [BLOCK_T, D]."""
    row = (t * H + h) * (D // 8 * BITS)
    if BITS == 8:
        return tl.load(base + row[:, None] + tl.arange(0, D)[None, :], mask=tmask[:, None], other=0).to(tl.int32)
    else:
        WORD: tl.constexpr = tl.uint32 if BITS <= 4 else tl.uint64  # holds 8 codes
        at = base + row[:, None] + (tl.arange(0, D // 8) * BITS)[None, :]
        if BITS == 1:
            words = tl.load(at, mask=tmask[:, None], other=0).to(WORD)
        elif BITS == 2:
            words = tl.load(at.to(tl.pointer_type(tl.uint16)), mask=tmask[:, None], other=0).to(WORD)
        elif BITS == 4:
            words = tl.load(at.to(tl.pointer_type(tl.uint32)), mask=tmask[:, None], other=0)
        else:
            LANES: tl.constexpr = 4 if BITS == 3 else 8
            k = tl.arange(0, LANES)
            data = tl.load(
                at[:, :, None] + k[None, None, :], mask=tmask[:, None, None] & (k < BITS)[None, None, :], other=0
            )
            words = tl.sum(data.to(WORD) << (k * 8).to(WORD)[None, None, :], axis=2)
        lane = tl.arange(0, 8)
        codes = (words[:, :, None] >> (lane * BITS).to(WORD)[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(codes, [BLOCK_T, D]).to(tl.int32)


@triton.jit
def _encode_tensor(
    x_raw,
    t,
    d,
    h,
    tmask,
    desc,
    out,
    out_f16,
    out_raw,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BITS: tl.constexpr,
    EXACT: tl.constexpr,
    ITEM: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    HADAMARD: tl.constexpr,
    LOG2_D: tl.constexpr,
    INV_SQRT_D: tl.constexpr,
):
    """Write one tensor (K or V) of one tile and head, ``desc`` its block of the tile row; return
    how many of its values or statistics are not finite (the host then sends that frame the
    reference's way: exact)."""
    codes_at = tl.load(desc + CODES)
    if BITS == EXACT:
        tl.store(out_raw + codes_at // ITEM + (t[:, None] * H + h) * D + d[None, :], x_raw, mask=tmask[:, None])
        return 0
    else:
        x = x_raw.to(tl.float32)
        if HADAMARD:
            x = _hadamard(x, BLOCK_T, D, LOG2_D, INV_SQRT_D)
        if PER_TOKEN:
            lo = tl.min(x, axis=1)[:, None]
            hi = tl.max(x, axis=1)[:, None]
        else:
            lo = tl.min(tl.where(tmask[:, None], x, float("inf")), axis=0)[None, :]
            hi = tl.max(tl.where(tmask[:, None], x, float("-inf")), axis=0)[None, :]
        LEVELS: tl.constexpr = (1 << BITS) - 1
        # mins: lo in fp16, one step down if rounding went up; scales: the step in fp16, one up if
        # rounding went down, so every value lies within [min, min + LEVELS * scale].
        mins = lo.to(tl.float16)
        mins = tl.where(mins.to(tl.float32) > lo, _fp16_step(mins, False), mins)
        step = tl.math.div_rn(hi - mins.to(tl.float32), tl.full([1, 1], LEVELS, tl.float32))
        scales = step.to(tl.float16)
        scales = tl.where(scales.to(tl.float32) < step, _fp16_step(scales, True), scales)
        scales = tl.maximum(scales, 2.0**-24)
        q = tl.floor(tl.math.div_rn(x - mins.to(tl.float32), scales.to(tl.float32)) + 0.5)
        codes = tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)
        _pack_store(codes, out + codes_at, t, h, tmask, H, D, BLOCK_T, BITS)

        mins_at = tl.load(desc + MINS) // 2
        scales_at = tl.load(desc + SCALES) // 2
        if PER_TOKEN:
            tl.store(out_f16 + mins_at + t * H + h, tl.reshape(mins, [BLOCK_T]), mask=tmask)
            tl.store(out_f16 + scales_at + t * H + h, tl.reshape(scales, [BLOCK_T]), mask=tmask)
        else:
            tl.store(out_f16 + mins_at + h * D + d, tl.reshape(mins, [D]))
            tl.store(out_f16 + scales_at + h * D + d, tl.reshape(scales, [D]))
        # The reference's statistics are not finite exactly when the rotated input is not (inf,
        # nan) or float16 overflows; it then sends the tensor exact, and so does the host.
        bad = tl.sum(tl.sum(tl.where(tmask[:, None] & ~(tl.abs(x) < float("inf")), 1, 0), axis=1), axis=0)
        finite = (tl.abs(mins.to(tl.float32)) < float("inf")) & (scales.to(tl.float32) < float("inf"))
        bad += tl.sum(tl.sum(tl.where(finite, 0, 1), axis=1), axis=0)
        return bad


@triton.jit
def _page_rows(block_table, desc, token, tmask, h, block_size, stride_block, stride_head, stride_token):
    """Element offset, in the cache, of head h's row of each token: through the request's blocks,
    from the tile's entry of the block table on."""
    blocks = block_table + tl.load(desc + TABLE)
    block = tl.load(blocks + token // block_size, mask=tmask, other=0).to(tl.int64)
    return block * stride_block + h * stride_head + (token % block_size) * stride_token


@triton.jit
def encode_kernel(
    cache,
    block_table,
    tiles,
    out,
    out_f16,
    out_raw,
    bad_tiles,
    block_size,
    stride_block,
    stride_head,
    stride_token,
    stride_channel,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    FIELDS: tl.constexpr,
    KEY_BITS: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    EXACT: tl.constexpr,
    ITEM: tl.constexpr,
    VALUE_PER_TOKEN: tl.constexpr,
    HADAMARD: tl.constexpr,
    LOG2_D: tl.constexpr,
    INV_SQRT_D: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    desc = tiles + tile * FIELDS
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    tmask = t < tl.load(desc + TOKENS)
    token = tl.load(desc + TOKEN) + t
    page = _page_rows(block_table, desc, token, tmask, h, block_size, stride_block, stride_head, stride_token)
    key = tl.load(cache + page[:, None] + d[None, :] * stride_channel, mask=tmask[:, None], other=0.0)
    bad = _encode_tensor(
        key,
        t,
        d,
        h,
        tmask,
        desc + KEY,
        out,
        out_f16,
        out_raw,
        H,
        D,
        BLOCK_T,
        KEY_BITS,
        EXACT,
        ITEM,
        False,
        HADAMARD,
        LOG2_D,
        INV_SQRT_D,
    )
    value = tl.load(cache + page[:, None] + (D + d[None, :]) * stride_channel, mask=tmask[:, None], other=0.0)
    bad += _encode_tensor(
        value,
        t,
        d,
        h,
        tmask,
        desc + VALUE,
        out,
        out_f16,
        out_raw,
        H,
        D,
        BLOCK_T,
        VALUE_BITS,
        EXACT,
        ITEM,
        VALUE_PER_TOKEN,
        HADAMARD,
        LOG2_D,
        INV_SQRT_D,
    )
    tl.store(bad_tiles + tile * H + h, bad)


@triton.jit
def _decode_tensor(
    dst,
    t,
    d,
    h,
    tmask,
    desc,
    src,
    src_f16,
    src_raw,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BITS: tl.constexpr,
    EXACT: tl.constexpr,
    ITEM: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    HADAMARD: tl.constexpr,
    LOG2_D: tl.constexpr,
    INV_SQRT_D: tl.constexpr,
):
    codes_at = tl.load(desc + CODES)
    if BITS == EXACT:
        raw = tl.load(src_raw + codes_at // ITEM + (t[:, None] * H + h) * D + d[None, :], mask=tmask[:, None])
        tl.store(dst, raw, mask=tmask[:, None])
    else:
        codes = _load_unpack(src + codes_at, t, h, tmask, H, D, BLOCK_T, BITS).to(tl.float32)
        mins_at = tl.load(desc + MINS) // 2
        scales_at = tl.load(desc + SCALES) // 2
        if PER_TOKEN:
            mins = tl.load(src_f16 + mins_at + t * H + h, mask=tmask, other=0.0).to(tl.float32)[:, None]
            scales = tl.load(src_f16 + scales_at + t * H + h, mask=tmask, other=0.0).to(tl.float32)[:, None]
        else:
            mins = tl.load(src_f16 + mins_at + h * D + d).to(tl.float32)[None, :]
            scales = tl.load(src_f16 + scales_at + h * D + d).to(tl.float32)[None, :]
        x = codes * scales + mins
        if HADAMARD:
            x = _hadamard(x, BLOCK_T, D, LOG2_D, INV_SQRT_D)
        tl.store(dst, _round_to(x, dst.dtype.element_ty), mask=tmask[:, None])


@triton.jit(do_not_specialize=["write_start", "write_end"])  # one variant whatever the range
def decode_kernel(
    cache,
    block_table,
    tiles,
    src,
    src_f16,
    src_raw,
    write_start,
    write_end,
    block_size,
    stride_block,
    stride_head,
    stride_token,
    stride_channel,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    FIELDS: tl.constexpr,
    KEY_BITS: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    EXACT: tl.constexpr,
    ITEM: tl.constexpr,
    VALUE_PER_TOKEN: tl.constexpr,
    HADAMARD: tl.constexpr,
    LOG2_D: tl.constexpr,
    INV_SQRT_D: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    desc = tiles + tile * FIELDS
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    token = tl.load(desc + TOKEN) + t
    # only tokens [write_start, write_end) are written: the rest of the request's blocks may hold
    # a prefix the decode computed itself, or belong to no one yet
    tmask = (t < tl.load(desc + TOKENS)) & (token >= write_start) & (token < write_end)
    page = _page_rows(block_table, desc, token, tmask, h, block_size, stride_block, stride_head, stride_token)
    _decode_tensor(
        cache + page[:, None] + d[None, :] * stride_channel,
        t,
        d,
        h,
        tmask,
        desc + KEY,
        src,
        src_f16,
        src_raw,
        H,
        D,
        BLOCK_T,
        KEY_BITS,
        EXACT,
        ITEM,
        False,
        HADAMARD,
        LOG2_D,
        INV_SQRT_D,
    )
    _decode_tensor(
        cache + page[:, None] + (D + d[None, :]) * stride_channel,
        t,
        d,
        h,
        tmask,
        desc + VALUE,
        src,
        src_f16,
        src_raw,
        H,
        D,
        BLOCK_T,
        VALUE_BITS,
        EXACT,
        ITEM,
        VALUE_PER_TOKEN,
        HADAMARD,
        LOG2_D,
        INV_SQRT_D,
    )


def check_supported(geometry: KVGeometry, group_tokens: int) -> None:
    """Raise ValueError, naming the field, for what the kernels cannot encode or decode."""
    d = geometry.head_dim
    if d < 8 or d & (d - 1):
        raise ValueError(f"head_dim {d}: the kernels need a power of two >= 8 (the CPU path takes any)")
    if geometry.fp8:
        raise ValueError(f"dtype {geometry.dtype}: the kernels code 16- and 32-bit caches (the reference takes fp8)")
    if not 1 <= group_tokens <= MAX_GROUP_TOKENS:
        raise ValueError(f"group_tokens {group_tokens}: the kernels take 1..{MAX_GROUP_TOKENS}")


def kernel_constants(geometry: KVGeometry, group_tokens: int, value_axis: str, hadamard: bool) -> dict:
    """Compile-time arguments and compile options of both kernels, widths aside (one compiled
    variant per pair)."""
    check_supported(geometry, group_tokens)
    d, block_t = geometry.head_dim, triton.next_power_of_2(group_tokens)
    return dict(
        H=geometry.num_kv_heads,
        D=d,
        BLOCK_T=block_t,
        FIELDS=TILE_FIELDS,
        EXACT=EXACT_BITS,
        ITEM=geometry.dtype.itemsize,
        VALUE_PER_TOKEN=value_axis == "token",
        HADAMARD=hadamard,
        LOG2_D=d.bit_length() - 1,
        INV_SQRT_D=1.0 / math.sqrt(d),
        # ~32 fp32 values of a tile per thread: fewer warps spill (benchmarks/bench_kernels.py --ptxas)
        num_warps=min(16, max(4, block_t * d // 512)),
        # the reference rounds each multiply and add on its own: fused into one fma.rn.f32 (a
        # compiler's default on GPUs), the Hadamard scale and the minimum's subtraction, or a
        # code's scale and its minimum, would round once and change bytes and values
        enable_fp_fusion=False,
    )


def _layout(cache: torch.Tensor) -> tuple[int, ...]:
    """block_size and the element strides of (block, head, token, channel): from the tensor itself."""
    if cache.dim() != 4:
        raise ValueError(
            f"a layer's cache must be [num_blocks, num_kv_heads, block_size, 2 * head_size], got {list(cache.shape)}"
        )
    return (cache.shape[2], *cache.stride())


def _buffer_views(buffer: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frame buffer as bytes, float16 statistics and cache-dtype exact values."""
    return buffer, buffer.view(torch.float16), buffer.view(dtype)


def encode_tiles(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    tiles: torch.Tensor,
    buffer: torch.Tensor,
    bad: torch.Tensor,
    key_bits: int,
    value_bits: int,
    constants: dict,
) -> None:
    """One program per (tile, KV head): ``tiles`` (rows of `kernels.tiles`) at these widths, read
    from the request's blocks of ``cache``, written into ``buffer``; ``bad`` [tiles, heads] gets
    each program's count of non-finite values."""
    encode_kernel[(tiles.shape[0], constants["H"])](
        cache,
        block_table,
        tiles,
        *_buffer_views(buffer, cache.dtype),
        bad,
        *_layout(cache),
        KEY_BITS=key_bits,
        VALUE_BITS=value_bits,
        **constants,
    )


def decode_tiles(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    tiles: torch.Tensor,
    buffer: torch.Tensor,
    write_start: int,
    write_end: int,
    key_bits: int,
    value_bits: int,
    constants: dict,
) -> None:
    """The inverse of `encode_tiles`, writing only tokens ``[write_start, write_end)``."""
    decode_kernel[(tiles.shape[0], constants["H"])](
        cache,
        block_table,
        tiles,
        *_buffer_views(buffer, cache.dtype),
        write_start,
        write_end,
        *_layout(cache),
        KEY_BITS=key_bits,
        VALUE_BITS=value_bits,
        **constants,
    )

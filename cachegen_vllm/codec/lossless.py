"""Lossless coding of a floating-point KV tensor (segment width `profile.LOSSLESS_BITS`): every element
comes back bit for bit, in the cache's own dtype (bf16, fp16, fp32 or fp8).

Why it pays: within one channel a tensor's values span a few binades, so the exponent field (8 bits
in bf16) carries far fewer bits of information than it has (docs/RESULTS.md measures how many),
while sign and mantissa are close to random and gain nothing from coding (SplitZip's observation).
So the exponent is coded relative to the channel's largest in a few fixed-length bits, with an
escape stream for the rare far ones, and the rest travels as it is. Fixed-length codes keep both
directions elementwise (one pass on a GPU); the only sequential step is the escape stream's
compaction, a prefix sum.

For one tensor of one segment, ``u`` [tokens, channels] the elements' bits as unsigned integers, a
dtype of E exponent and M mantissa bits (`geometry.FLOAT_FIELDS`):

1. fields: exponent ``e = (u >> M) & (2**E - 1)``; rest ``r = sign << M | mantissa`` (R = M + 1 bits);
2. ``top[c]`` = the largest ``e`` of channel ``c`` over the segment's tokens;
3. code ``top[c] - e`` in `CODE_BITS` bits if below `ESCAPE`, else `ESCAPE`, and ``e`` goes to the
   escape stream (zeros, subnormals, values 2**-7 or more below the channel's largest).

Arrays on the wire (docs/FORMAT.md): ``top`` u8 [C]; the codes bit-packed; the rest as R // 8
little-endian bytes per element, then its R % 8 high bits bit-packed; the escaped exponents, u8 each
in element order (their count travels as the segment's stream words).

`split` and `merge` do steps 1-3 and their inverse; a device can register faster ones
(`register_fields`: the Triton kernels' for CUDA) that must return the same integers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from cachegen_vllm.codec.bitpack import low_bytes, pack, packed_nbytes, unpack
from cachegen_vllm.codec.geometry import FLOAT_FIELDS

CODE_BITS = 3
ESCAPE = (1 << CODE_BITS) - 1


class FieldCoder(NamedTuple):
    """Steps 1-3 and back on one kind of device. ``split(u int64 [T, C], E, M)`` -> (top int64 [C],
    codes int64 [T, C], rest int64 [T, C]); ``merge(top [C], codes [T, C], rest [T, C], escaped
    exponents int64 [T, C] (read where a code is `ESCAPE`), E, M)`` -> u int64 [T, C]."""

    split: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    merge: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def split_fields(u: torch.Tensor, exponent_bits: int, mantissa_bits: int):
    """The reference of `FieldCoder.split`: plain torch ops, any device."""
    e = (u >> mantissa_bits) & ((1 << exponent_bits) - 1)
    rest = ((u >> (exponent_bits + mantissa_bits)) << mantissa_bits) | (u & ((1 << mantissa_bits) - 1))
    top = e.amax(0)
    return top, (top - e).clamp_max(ESCAPE), rest


def merge_fields(
    top: torch.Tensor,
    codes: torch.Tensor,
    rest: torch.Tensor,
    escaped: torch.Tensor,
    exponent_bits: int,
    mantissa_bits: int,
):
    """The reference of `FieldCoder.merge`."""
    e = torch.where(codes == ESCAPE, escaped, top - codes)
    sign = rest >> mantissa_bits
    return (sign << (exponent_bits + mantissa_bits)) | (e << mantissa_bits) | (rest & ((1 << mantissa_bits) - 1))


REFERENCE_FIELDS = FieldCoder(split_fields, merge_fields)
_FIELDS: dict[str, FieldCoder] = {}


def register_fields(device_type: str, coder: FieldCoder) -> None:
    """Split and merge tensors on ``device_type`` with ``coder``, which must give the reference's
    integers (importing `cachegen_vllm.kernels.lossless_fields` registers the Triton one for CUDA)."""
    _FIELDS[device_type] = coder


def fields_for(device: torch.device) -> FieldCoder:
    return _FIELDS.get(device.type, REFERENCE_FIELDS)


def array_sizes(elements: int, channels: int, dtype: torch.dtype, escapes: int) -> list[int]:
    """Bytes of a lossless tensor's five arrays: top, codes, rest bytes, rest high bits, escapes
    (an array a dtype has no use for is empty)."""
    rest_bits = FLOAT_FIELDS[dtype][1] + 1
    return [
        channels,
        packed_nbytes(elements, CODE_BITS),
        elements * (rest_bits // 8),
        packed_nbytes(elements, rest_bits % 8),
        escapes,
    ]


# the integer type of each element width torch can view a float tensor as (uint8 for fp8)
_BITS_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _as_unsigned(x: torch.Tensor) -> torch.Tensor:
    """int64 [T, C]: each element's bits as an unsigned integer."""
    width = x.element_size()
    return x.contiguous().view(_BITS_OF_WIDTH[width]).to(torch.int64) & ((1 << (8 * width)) - 1)


def _from_unsigned(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    width = torch.empty((), dtype=dtype).element_size()
    wrapped = torch.where(u >= 1 << (8 * width - 1), u - (1 << (8 * width)), u) if width > 1 else u
    return wrapped.to(_BITS_OF_WIDTH[width]).view(dtype)


@dataclass(frozen=True)
class Split:
    """One tensor coded on its device, its escape stream compacted but not yet cut to length (the
    count is a device scalar: the caller reads it with its other host reads)."""

    arrays: list[torch.Tensor]  # uint8: top, codes, rest bytes, rest high bits
    escapes: torch.Tensor  # uint8 [n]: the escaped exponents first, then zeros
    escape_count: torch.Tensor  # int64 0-d

    def escape_stream(self, count: int) -> torch.Tensor:
        return self.escapes[:count]


def split(x: torch.Tensor) -> Split:
    """Code ``x`` [tokens, ...] (any float dtype of `FLOAT_FIELDS`) with no host read."""
    exponent_bits, mantissa_bits = FLOAT_FIELDS[x.dtype]
    u = _as_unsigned(x.reshape(x.shape[0], -1))
    top, codes, rest = fields_for(u.device).split(u, exponent_bits, mantissa_bits)
    rest_bits = mantissa_bits + 1
    flat_codes = codes.reshape(-1)
    escaped = flat_codes == ESCAPE
    # compaction: escape k goes to slot k, everything else to a spare slot past the end
    slot = torch.where(escaped, torch.cumsum(escaped, 0) - 1, flat_codes.numel())
    exponents = ((u >> mantissa_bits) & ((1 << exponent_bits) - 1)).reshape(-1)
    escapes = torch.zeros(flat_codes.numel() + 1, dtype=torch.int64, device=u.device).scatter_(0, slot, exponents)
    high = rest_bits % 8
    arrays = [
        top.to(torch.uint8),
        pack(flat_codes.to(torch.uint8), CODE_BITS),
        low_bytes(rest, rest_bits // 8),
        pack((rest.reshape(-1) >> (8 * (rest_bits // 8))).to(torch.uint8), high)
        if high
        else torch.empty(0, dtype=torch.uint8, device=u.device),
    ]
    return Split(arrays, escapes[:-1].to(torch.uint8), escaped.sum())


class LosslessError(ValueError):
    """A lossless tensor's arrays contradict each other (the frame's checksum held: a bad producer)."""


def merge(arrays: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor [shape] of ``dtype`` that `split` coded into these five uint8 arrays (sized as
    `array_sizes` says). LosslessError if the escapes or codes do not fit together."""
    top, packed_codes, rest_bytes, rest_high, escapes = arrays
    exponent_bits, mantissa_bits = FLOAT_FIELDS[dtype]
    tokens, channels = shape[0], top.numel()
    n = tokens * channels
    codes = unpack(packed_codes, CODE_BITS, n).to(torch.int64)
    escaped = codes == ESCAPE
    if int(escaped.sum()) != escapes.numel():
        raise LosslessError(f"{int(escaped.sum())} codes escape, the stream holds {escapes.numel()} exponents")
    top = top.to(torch.int64)
    codes = codes.view(tokens, channels)
    if bool(((top < codes) & ~escaped.view(tokens, channels)).any()):
        raise LosslessError("a code points below exponent 0")
    if bool((escapes.to(torch.int64) >= 1 << exponent_bits).any()):
        raise LosslessError(f"an escaped exponent does not fit in {exponent_bits} bits")
    rest_bits = mantissa_bits + 1
    whole = rest_bits // 8
    rest = torch.zeros(n, dtype=torch.int64, device=top.device)
    if whole:
        planes = rest_bytes.view(n, whole).to(torch.int64)
        for k in range(whole):
            rest |= planes[:, k] << (8 * k)
    if rest_bits % 8:
        rest |= unpack(rest_high, rest_bits % 8, n).to(torch.int64) << (8 * whole)
    index = (torch.cumsum(escaped, 0) - 1).clamp_min(0)
    stream = escapes.to(torch.int64)
    spread = stream[index] if stream.numel() else torch.zeros_like(index)
    u = fields_for(top.device).merge(
        top, codes, rest.view(tokens, channels), spread.view(tokens, channels), exponent_bits, mantissa_bits
    )
    return _from_unsigned(u, dtype).view(shape)

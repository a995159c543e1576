"""Bit packing of b-bit codes, b in 1..8.

Layout (the wire format's, see docs/FORMAT.md): a little-endian bit stream. Code i occupies bits
``[i*b, (i+1)*b)`` of the stream, bit k of the stream is bit ``k % 8`` of byte ``k // 8``. Every
8 codes fill exactly b whole bytes, so a GPU thread that owns 8 consecutive codes writes b
contiguous bytes and a warp writes one contiguous span: coalesced, with no read-modify-write.
The stream is ``ceil(n*b/8)`` bytes; unused high bits of the last byte are zero.

Plain torch ops, so the same code runs on CPU and CUDA tensors.
"""

from __future__ import annotations

import torch


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes < 2**bits into ``packed_nbytes(len, bits)`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    count = codes.numel()
    if bits == 8:
        return codes.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(codes.reshape(-1).to(torch.int64), (0, (-count) % 8))
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    # 8 codes of at most 7 bits fit in 56 bits of an int64: the sum is a bitwise OR.
    words = (padded.view(-1, 8) << shifts).sum(dim=1, keepdim=True)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    packed = ((words >> byte_shifts) & 0xFF).to(torch.uint8).view(-1)
    return packed[: packed_nbytes(count, bits)]


def low_bytes(values: torch.Tensor, width: int) -> torch.Tensor:
    """The low ``width`` bytes of each int64, little-endian, uint8 [n * width]: fixed-width
    integers as the format stores them, with no narrow integer types on the device."""
    return values.reshape(-1).contiguous().view(torch.uint8).view(-1, 8)[:, :width].reshape(-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: ``count`` uint8 codes from a packed stream."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    nbytes = packed_nbytes(count, bits)
    if packed.numel() != nbytes:
        raise ValueError(f"{count} codes of {bits} bits need {nbytes} bytes, got {packed.numel()}")
    if bits == 8:
        return packed.reshape(-1).clone()
    groups = (count + 7) // 8
    padded = torch.nn.functional.pad(packed.reshape(-1).to(torch.int64), (0, groups * bits - nbytes))
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (padded.view(groups, bits) << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8).view(-1)
    return codes[:count]

"""Asymmetric uniform quantization with fp16 statistics, and the per-head Hadamard rotation.

Codes are ``q = clamp(floor((x - min) / scale + 0.5), 0, 2**b - 1)`` in fp32, and values come back
as ``min + q * scale``. ``min`` and ``scale`` travel as fp16; they are rounded *outward* (min down,
scale up) so that the quantization grid still covers [min, max] and the error stays within half a
step. Every operation is a single IEEE fp32 op in a fixed order so a GPU kernel reproduces the codes
bit for bit.

Two groupings (`axis`):
- ``"channel"``: one (min, scale) per channel per group of ``group_tokens`` consecutive tokens
  (CacheGen/KIVI keys: channels have stable ranges, outlier channels keep their own scale);
- ``"token"``: one (min, scale) per token and head, over that head's channels (KIVI values).
"""

from __future__ import annotations

import math

import torch

STAT_DTYPE = torch.float16
_SMALLEST_SCALE = 2.0**-24  # fp16's smallest subnormal: a constant group still divides safely


def hadamard_block(head_dim: int) -> int:
    """The Hadamard block of a head: the largest power of two dividing ``head_dim`` (the whole head
    when it is a power of two; 16 of 80, 32 of 96)."""
    return head_dim & -head_dim


def hadamard_(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal block Walsh-Hadamard transform over the last dimension, in place: each run of
    `hadamard_block` channels is rotated on its own.

    Butterflies in Sylvester order, then one multiply by 1/sqrt(block): a fixed sequence of fp32
    adds that a kernel can repeat exactly. The transform is its own inverse. Rotating each head
    before quantizing spreads outlier channels over the head (over its block, where the head is not
    a power of two wide), which a min/max grid prefers.
    """
    d = x.shape[-1]
    block = hadamard_block(d)
    h = 1
    while h < block:
        pairs = x.view(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = pairs[..., 0, :].clone(), pairs[..., 1, :]
        pairs[..., 0, :] += b
        pairs[..., 1, :] = a - b
        h *= 2
    return x.mul_(1.0 / math.sqrt(block))


def fixed_point_exponent(x: torch.Tensor) -> torch.Tensor:
    """The power of two ``e`` that puts ``max|x| * 2**e`` in [2**15, 2**16) (0 if all zero): the
    fixed-point scale under which sums of rounded values are exact integers on any device. An int32
    0-d tensor on ``x``'s device: reading it would make the host wait for a GPU."""
    peak = x.abs().amax() if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)
    _, exponent = torch.frexp(peak)
    return torch.where(peak == 0, 0, 16 - exponent).to(torch.int32)


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` in float64, exact, as a 0-d tensor on the exponent's device: multiplied
    into fp32 tensors as ``.float()``, it rounds as a Python float scalar would."""
    return torch.exp2(exponent.to(torch.float64))


def _grouped(x: torch.Tensor, axis: str, group_tokens: int) -> torch.Tensor:
    """View [T, H, D] as [groups, members, lanes]; statistics reduce over members."""
    tokens, heads, dim = x.shape
    if axis == "token":
        return x.reshape(tokens * heads, dim, 1)
    flat = x.reshape(tokens, heads * dim)
    pad = (-tokens) % group_tokens
    if pad:  # repeat the last token: it cannot change a group's min or max
        flat = torch.cat([flat, flat[-1:].expand(pad, -1)])
    return flat.view(-1, group_tokens, heads * dim)


def stats_count(tokens: int, heads: int, dim: int, axis: str, group_tokens: int) -> int:
    """How many (min, scale) pairs a [tokens, heads, dim] block has."""
    if axis == "token":
        return tokens * heads
    return -(-tokens // group_tokens) * heads * dim


def quantize(x: torch.Tensor, bits: int, axis: str, group_tokens: int):
    """Quantize fp32 [T, H, D]. Returns (codes uint8 [T*H*D] token-major, mins fp16, scales fp16).

    Statistics that fp16 cannot hold come back non-finite; the caller sends such blocks exact.
    """
    levels = (1 << bits) - 1
    groups = _grouped(x, axis, group_tokens)
    lo = groups.amin(dim=1, keepdim=True)
    hi = groups.amax(dim=1, keepdim=True)
    mins = lo.to(STAT_DTYPE)
    mins = torch.where(mins.float() > lo, torch.nextafter(mins, torch.full_like(mins, -math.inf)), mins)
    step = (hi - mins.float()) / levels
    scales = step.to(STAT_DTYPE)
    scales = torch.where(scales.float() < step, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    scales = scales.clamp_min(_SMALLEST_SCALE)
    codes = torch.floor((groups - mins.float()) / scales.float() + 0.5).clamp_(0, levels).to(torch.uint8)
    codes = codes.reshape(-1, x.shape[1] * x.shape[2])[: x.shape[0]]
    return codes.reshape(-1), mins.reshape(-1), scales.reshape(-1)


def dequantize(codes: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor, shape, axis: str, group_tokens: int):
    """Inverse of `quantize`: fp32 [T, H, D]."""
    tokens, heads, dim = shape
    values = codes.float().view(tokens, heads, dim)
    if axis == "token":
        out = values.reshape(tokens * heads, dim) * scales.float()[:, None] + mins.float()[:, None]
        return out.view(tokens, heads, dim)
    width = heads * dim
    group = torch.arange(tokens, device=codes.device) // group_tokens
    out = values.view(tokens, width) * scales.float().view(-1, width)[group] + mins.float().view(-1, width)[group]
    return out.view(tokens, heads, dim)

"""Rotary position embedding undone before a basis and redone after it (keys only).

Why: the cache holds keys after RoPE, ``k(p) = R(p) k'``, whose channel pairs turn with the token's
position ``p``, each at its own frequency. Across a chunk a pair's mean turns with it, so centring
per chunk leaves it in the variance, and the correlations between pairs are smeared over angles; a
basis fitted on ``k'`` (KVQuant, KVTC) finds the low-rank structure the keys of a head share. The
error that matters is unchanged by the rotation: ``q(p) . R(p) dk' = (R(-p) q(p)) . dk'``, so the
metric of pre-RoPE keys is the second moment of the queries before RoPE (`fitting.basis`).

Layout: the rotary channels are the first ``2 * len(frequencies)`` of a head, paired as Llama,
Qwen, Mistral and Gemma pair them in transformers and vLLM ("neox" style): channel ``i`` with
``i + half`` for ``i < half``; channels past them do not turn. Pair ``i`` turns by ``p * f[i]``.

Exactness, because a GPU producer and a CPU producer must write the same bytes: the encoder works
on the basis's fixed-point integers (``|x| < 2**16``, `codec.basis`) and turns them with cosines
and sines rounded to ``2**-TABLE_BITS``, every product and sum an integer below 2**48 (float64
holds it whatever the device), then rounds the result to an integer again (half to even). The
tables are computed on the host in float64 for the frame's positions, the same calls on any
producer, and copied to the tensor's device. The decoder turns its float64 values back with
unrounded tables: it only makes values, not bytes.
"""

from __future__ import annotations

import torch

TABLE_BITS = 30  # cos and sin as integers below 2**30: a product with a fixed-point value stays below 2**46


def _angles(frequencies: torch.Tensor, token_start: int, count: int) -> torch.Tensor:
    """float64 [count, pairs] on the host: each position's angle for each pair."""
    positions = torch.arange(token_start, token_start + count, dtype=torch.float64)
    return positions[:, None] * frequencies.double().cpu()[None, :]


def _turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [T, H, D] with its rotary pairs turned by the angles whose (cos, sin) [T, pairs] are given
    (a new tensor; unrounded)."""
    half = cos.shape[1]
    a, b = x[..., :half], x[..., half : 2 * half]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, x[..., 2 * half :]], dim=-1)


def unturn_fixed(fixed: torch.Tensor, frequencies: torch.Tensor, token_start: int) -> torch.Tensor:
    """float64 integers [T, H, D]: fixed-point keys ``fixed`` (float64 integers below 2**16 in
    magnitude) of positions ``token_start..`` with RoPE undone, rounded to integers again. The same
    on every device (module docstring)."""
    angles = _angles(frequencies, token_start, fixed.shape[0])
    # the tables' integers times 2**-TABLE_BITS: a power of two, so every product and sum below is
    # the exact one scaled, whether or not the device fuses the multiply and the add
    scale = 2.0**TABLE_BITS
    cos = (torch.round(torch.cos(angles) * scale) / scale).to(fixed.device)[:, None, :]
    sin = (torch.round(torch.sin(angles) * scale) / scale).to(fixed.device)[:, None, :]
    half = cos.shape[-1]
    a, b = fixed[..., :half], fixed[..., half : 2 * half]
    out = fixed.clone() if 2 * half < fixed.shape[-1] else torch.empty_like(fixed)  # unturned channels stay
    first, second = out[..., :half], out[..., half : 2 * half]
    torch.mul(a, cos, out=first).addcmul_(b, sin)  # turned by -angle: a cos + b sin
    torch.mul(b, cos, out=second).addcmul_(a, sin, value=-1)  # b cos - a sin
    return out.round_()


def turn(x: torch.Tensor, frequencies: torch.Tensor, token_start: int, sign: int = 1) -> torch.Tensor:
    """float64 [T, H, D]: ``x`` with RoPE applied (``sign`` 1: what the decoder does to the keys it
    gets back) or undone (-1: what the fit does to the keys it measures), in float64."""
    angles = sign * _angles(frequencies, token_start, x.shape[0]).to(x.device)
    return _turn(x.double(), torch.cos(angles), torch.sin(angles))

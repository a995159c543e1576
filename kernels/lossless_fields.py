"""The lossless coding's field split and merge in Triton (`codec.lossless`, steps 1-3): one program
per block of channels, which first finds each channel's top exponent over the tensor's tokens and
then codes every element, so each element is read twice and written once, with no intermediate
tensors. Integer operations only, so the results are the torch reference's exactly (the tests check
that under TRITON_INTERPRET=1). Importing the module registers them with the codec for CUDA
tensors (`codec.lossless.register_fields`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cachegen_vllm.codec import lossless

BLOCK_TOKENS = 32
BLOCK_CHANNELS = 64


@triton.jit(do_not_specialize=["tokens", "channels"])
def split_kernel(
    u,
    top,
    codes,
    rest,
    tokens,
    channels,
    E: tl.constexpr,
    M: tl.constexpr,
    ESCAPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    live_c = c < channels
    highest = tl.zeros([BLOCK_C], tl.int64)
    for t0 in range(0, tokens, BLOCK_T):  # pass 1: the channel's top exponent
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < tokens)[:, None] & live_c[None, :]
        x = tl.load(u + t[:, None].to(tl.int64) * channels + c[None, :], mask=mask, other=0)
        highest = tl.maximum(highest, tl.max((x >> M) & ((1 << E) - 1), axis=0))
    tl.store(top + c, highest, mask=live_c)
    for t0 in range(0, tokens, BLOCK_T):  # pass 2: codes relative to it, and sign + mantissa
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < tokens)[:, None] & live_c[None, :]
        at = t[:, None].to(tl.int64) * channels + c[None, :]
        x = tl.load(u + at, mask=mask, other=0)
        e = (x >> M) & ((1 << E) - 1)
        tl.store(codes + at, tl.minimum(highest[None, :] - e, ESCAPE), mask=mask)
        tl.store(rest + at, ((x >> (E + M)) << M) | (x & ((1 << M) - 1)), mask=mask)


@triton.jit(do_not_specialize=["tokens", "channels"])
def merge_kernel(
    top,
    codes,
    rest,
    escaped,
    u,
    tokens,
    channels,
    E: tl.constexpr,
    M: tl.constexpr,
    ESCAPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (t < tokens)[:, None] & (c < channels)[None, :]
    at = t[:, None].to(tl.int64) * channels + c[None, :]
    code = tl.load(codes + at, mask=mask, other=0)
    r = tl.load(rest + at, mask=mask, other=0)
    highest = tl.load(top + c, mask=c < channels, other=0)
    e = tl.where(code == ESCAPE, tl.load(escaped + at, mask=mask, other=0), highest[None, :] - code)
    tl.store(u + at, ((r >> M) << (E + M)) | (e << M) | (r & ((1 << M) - 1)), mask=mask)


def split(u: torch.Tensor, exponent_bits: int, mantissa_bits: int):
    """`codec.lossless.split_fields` on the device: (top [C], codes [T, C], rest [T, C]), int64."""
    tokens, channels = u.shape
    u = u.contiguous()
    top = torch.empty(channels, dtype=torch.int64, device=u.device)
    codes, rest = torch.empty_like(u), torch.empty_like(u)
    grid = (triton.cdiv(channels, BLOCK_CHANNELS),)
    split_kernel[grid](
        u,
        top,
        codes,
        rest,
        tokens,
        channels,
        exponent_bits,
        mantissa_bits,
        lossless.ESCAPE,
        BLOCK_TOKENS,
        BLOCK_CHANNELS,
    )
    return top, codes, rest


def merge(top, codes, rest, escaped, exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """`codec.lossless.merge_fields` on the device: u int64 [T, C]."""
    tokens, channels = codes.shape
    u = torch.empty((tokens, channels), dtype=torch.int64, device=codes.device)
    grid = (triton.cdiv(tokens, BLOCK_TOKENS), triton.cdiv(channels, BLOCK_CHANNELS))
    merge_kernel[grid](
        top.contiguous(),
        codes.contiguous(),
        rest.contiguous(),
        escaped.contiguous(),
        u,
        tokens,
        channels,
        exponent_bits,
        mantissa_bits,
        lossless.ESCAPE,
        BLOCK_TOKENS,
        BLOCK_CHANNELS,
    )
    return u


lossless.register_fields("cuda", lossless.FieldCoder(split, merge))

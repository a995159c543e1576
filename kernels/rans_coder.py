"""rANS lanes in Triton: one thread per lane, the same integer steps as `cachegen_vllm.codec.rans`
(whose torch loop runs one tensor operation per step for all lanes; here each lane runs its own
loop), so the states, words and symbols are identical, which the tests check under
TRITON_INTERPRET=1. `encode` and `decode` take and return what the torch functions do; importing
the module registers them with the codec for CUDA tensors (`codec.entropy.register_coder`).

Encoding writes every step's candidate word and whether it was emitted to a [steps, lanes]
scratch grid; the lanes' streams are then compacted in lane order by one scatter (as the torch
coder does), with no host read. Decoding finds each symbol by a binary search of its row of cumulative
frequencies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cachegen_vllm.codec import entropy, rans
from cachegen_vllm.codec.rans import RansError

BLOCK_LANES = 128
# The kernels spell the coder's constants out (65536, 16-bit shifts): Triton takes module constants
# only as constexprs. Should they ever change, this stops the import.
assert rans.PROB_SCALE == rans.STATE_LOWER == 1 << 16 and rans.PROB_BITS == rans.WORD_BITS == 16


@triton.jit(do_not_specialize=["steps", "lanes"])
def encode_kernel(freq, cum, words, emitted, states, steps, lanes, BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < lanes
    x = tl.full([BLOCK], 65536, tl.int64)
    at = tl.full([BLOCK], steps, tl.int64) * lanes + lane  # int64: grids may pass 2**31 codes
    for _ in range(steps):
        at -= lanes
        f = tl.load(freq + at, mask=live, other=65536)
        c = tl.load(cum + at, mask=live, other=0)
        emit = x >= (f << 16)
        tl.store(words + at, x & 65535, mask=live)
        tl.store(emitted + at, emit.to(tl.int8), mask=live)
        x = tl.where(emit, x >> 16, x)
        x = ((x // f) << 16) + x % f + c
    tl.store(states + lane, x, mask=live)


@triton.jit(do_not_specialize=["steps", "lanes"])
def decode_kernel(
    states,
    stream,
    lane_begin,
    lane_end,
    cum,
    row_start,
    row_end,
    rows,
    active,
    out,
    ok,
    steps,
    lanes,
    SEARCH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = lane < lanes
    x = tl.load(states + lane, mask=valid, other=65536)
    ptr = tl.load(lane_begin + lane, mask=valid, other=0)
    end = tl.load(lane_end + lane, mask=valid, other=0)
    at = lane.to(tl.int64) - lanes
    for _ in range(steps):
        at += lanes
        row = tl.load(rows + at, mask=valid, other=0)
        live = (tl.load(active + at, mask=valid, other=0) != 0) & valid
        slot = x & 65535
        first = tl.load(row_start + row, mask=valid, other=0)
        lo = first
        hi = tl.load(row_end + row, mask=valid, other=1) - 1  # cum[lo] = 0 <= slot < cum[hi] = 2**16
        for _ in range(SEARCH):
            mid = (lo + hi) // 2
            below = tl.load(cum + mid, mask=valid, other=0) <= slot
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        c = tl.load(cum + lo, mask=valid, other=0)
        f = tl.load(cum + lo + 1, mask=valid, other=65536) - c
        y = f * (x >> 16) + slot - c
        need = (y < 65536) & live
        word = tl.load(stream + ptr, mask=need & (ptr < end), other=0)
        x = tl.where(need, (y << 16) | word, tl.where(live, y, x))
        ptr += need.to(tl.int64)
        tl.store(out + at, tl.where(live, lo - first, 0), mask=valid)
    tl.store(ok + lane, ((ptr == end) & (x == 65536)).to(tl.int8), mask=valid)


def encode(freq: torch.Tensor, cum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cachegen_vllm.codec.rans.encode`, one thread per lane."""
    steps, lanes = freq.shape
    words = torch.empty((steps, lanes), dtype=torch.int64, device=freq.device)
    emitted = torch.empty((steps, lanes), dtype=torch.int8, device=freq.device)
    states = torch.empty(lanes, dtype=torch.int64, device=freq.device)
    encode_kernel[(triton.cdiv(lanes, BLOCK_LANES),)](
        freq.contiguous(),
        cum.contiguous(),
        words,
        emitted,
        states,
        steps,
        lanes,
        BLOCK=BLOCK_LANES,
        enable_fp_fusion=False,  # integers only: said so that Triton does not warn about its default
    )
    return states, *rans.compact_lanes(words, emitted.bool())


def decode(states, stream, lane_words, cum, row_start, rows, active) -> torch.Tensor:
    """`cachegen_vllm.codec.rans.decode`, one thread per lane."""
    steps, lanes = rows.shape
    device = states.device
    end = torch.cumsum(lane_words, 0)
    row_end = torch.cat([row_start[1:], torch.tensor([cum.numel()], device=device)])
    widest = int((row_end - row_start).max())
    out = torch.empty((steps, lanes), dtype=torch.int64, device=device)
    ok = torch.empty(lanes, dtype=torch.int8, device=device)
    decode_kernel[(triton.cdiv(lanes, BLOCK_LANES),)](
        states.contiguous(),
        stream.contiguous(),
        (end - lane_words).contiguous(),
        end,
        cum.contiguous(),
        row_start.contiguous(),
        row_end,
        rows.contiguous(),
        active.to(torch.int8).contiguous(),
        out,
        ok,
        steps,
        lanes,
        SEARCH=max(1, (widest - 1).bit_length()),
        BLOCK=BLOCK_LANES,
        enable_fp_fusion=False,
    )
    if not bool(ok.all()):
        raise RansError("an entropy-coded lane does not decode to its end: the stream is corrupted")
    return out


# Importing this module is what makes the codec code CUDA tensors' lanes here.
entropy.register_coder("cuda", entropy.RansCoder(encode, decode))

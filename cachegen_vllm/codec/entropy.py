"""Entropy-coded quantization (profile ``coding = "rans"``): a uniform step sized to the data,
codes centred per channel, and rANS with a frequency table per channel picked from a fixed bank.

Why this quantizer: min/max grids spread codes almost uniformly, so entropy-coding them saves
little, and their per-group statistics cost a large share of the bits. A uniform step with the
codes entropy-coded spends bits where the data is (docs/RESULTS.md has the rate-distortion table).

For one tensor of one segment, ``x`` [tokens, channels] in fp32 (rotated if the frame says so):

1. **Fixed-point statistics**, exact integer sums, so that any reduction order (torch on CPU, a
   GPU kernel) gives the same bits: ``e`` is the power of two that puts ``max|x|`` in
   [2**15, 2**16); per channel ``center = fp16(fp32(sum(round(x * 2**e))) / fp32(tokens) * 2**-e)``;
   ``d = round((x - center) * 2**e)``; ``step = fp32(sqrt(fp32(sum(d*d)) / fp32(n)) * GAIN) *
   2**(-e - bits)``, or ``2**-e`` if that is 0. GAIN = sqrt(2 pi e) makes a Gaussian's codes cost
   about ``bits`` bits each at high rate, so the segment's width still reads as a rate.
2. **Codes** ``q = clamp(floor((x - center) / step + 0.5), -2**a, 2**a - 1)``, symbols
   ``q + 2**a`` (an alphabet of ``2**(a+1)``, ``a`` = `alphabet_bits`); values come back as
   ``q * step + center``.
3. **Tables**: each channel codes with one of `TABLES` discretized Gaussians (`bank`), the one that
   codes that channel's symbols in the fewest bits (integer costs, lowest index on ties): one byte
   per channel on the wire instead of a table.
4. **Lanes**: the ``n`` codes in token-major order are dealt to ``K = ceil(n / lane_symbols)``
   lanes, code ``i * K + j`` being step ``i`` of lane ``j`` (so a step touches K consecutive codes).

The lanes go through a `RansCoder`: the compiled CPU loops (`rans_numba`) on a CPU, what a device
registers (`register_coder`: the Triton kernels' for CUDA), or the torch reference (`rans`)
anywhere else. All write the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import xxhash

from cachegen_vllm.codec import rans, rans_numba
from cachegen_vllm.codec.bitpack import low_bytes
from cachegen_vllm.codec.format import rans_lanes
from cachegen_vllm.codec.quant import fixed_point_exponent, power_of_two

TABLES = 128
GAIN = math.sqrt(2 * math.pi * math.e)
COST_SCALE = 1 << 10  # integer costs in 1/1024 bit


def table_width(index: int) -> float:
    """Standard deviation, in steps, of bank table ``index``: 2**(index/8 - 5), 0.03 to 1,900."""
    return 2.0 ** (index / 8 - 5)


# xxh3-64 of each width's bank (freq then costs, int64 little-endian): the bank is computed with
# the math library's erfc and log2, and a platform whose results differ would pick other tables or
# code other bytes. It is checked before first use; a mismatch refuses to code rather than emit
# bytes another machine reads differently.
BANK_DIGESTS = {
    1: 0x82CC45CD38DAA952,
    2: 0xA76934C69601830F,
    3: 0x2F651A99315D67FC,
    4: 0x7B7BEF5A4F7351C4,
    5: 0x8EE55C69CBE12DAF,
    6: 0x52BB710B920E200B,
    7: 0x0259E8EEB00D9EF2,
    8: 0xA85A880BAC0A3217,
}


def _gaussian_freqs(sigma: float, half: int) -> list[int]:
    """Frequencies (out of PROB_SCALE, each >= 1) of q in [-half, half) for N(0, sigma) rounded to
    the nearest integer, the tails folded into the end symbols."""

    def tail(z: float) -> float:  # P(X > z), exact in the tails where 1 - cdf would cancel
        return 0.5 * math.erfc(z / (sigma * math.sqrt(2)))

    def mass(a: float, b: float) -> float:  # P(a < X < b), by symmetry from upper tails only
        if a >= 0:
            return tail(a) - tail(b)
        if b <= 0:
            return tail(-b) - tail(-a)
        return 1.0 - tail(b) - tail(-a)

    probs = [
        mass(-math.inf if q == -half else q - 0.5, math.inf if q == half - 1 else q + 0.5) for q in range(-half, half)
    ]
    spare = rans.PROB_SCALE - len(probs)  # every symbol gets 1 so that every code can be coded
    freqs = [1 + int(p * spare) for p in probs]
    freqs[max(range(len(freqs)), key=lambda i: (freqs[i], -i))] += rans.PROB_SCALE - sum(freqs)
    return freqs


@cache
def bank(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cumulative frequencies [TABLES, 2**(bits+1) + 1], costs [TABLES, 2**(bits+1)] in 1/COST_SCALE
    bit), int64 on the CPU. RuntimeError if this machine computes other tables than the format's."""
    half = 1 << bits
    freqs = torch.tensor([_gaussian_freqs(table_width(k), half) for k in range(TABLES)], dtype=torch.int64)
    costs = torch.tensor(
        [[round(COST_SCALE * math.log2(rans.PROB_SCALE / f)) for f in row] for row in freqs.tolist()], dtype=torch.int64
    )
    digest = xxhash.xxh3_64_intdigest(freqs.numpy().tobytes() + costs.numpy().tobytes())
    if digest != BANK_DIGESTS[bits]:
        raise RuntimeError(
            f"the rANS tables for {bits}-bit codes computed here (xxh3 {digest:016x}) differ from the wire "
            f"format's ({BANK_DIGESTS[bits]:016x}): this machine's math library rounds erfc/log2 differently"
        )
    cum = torch.nn.functional.pad(torch.cumsum(freqs, 1), (1, 0))
    return cum, costs


@cache
def _bank_on(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`bank` on ``device``, copied there once."""
    cum, costs = bank(bits)
    return cum.to(device), costs.to(device)


class RansCoder(NamedTuple):
    """What codes lanes on one kind of device, with `rans.encode` and `rans.decode`'s contract."""

    encode: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    decode: Callable[..., torch.Tensor]  # (states, stream, lane_words, cum, row_start, rows, active)


REFERENCE_CODER = RansCoder(rans.encode, rans.decode)
_CODERS: dict[str, RansCoder] = {"cpu": RansCoder(rans_numba.encode, rans_numba.decode)}


def register_coder(device_type: str, coder: RansCoder) -> None:
    """Code the lanes of tensors on ``device_type`` ("cuda", ...) with ``coder``, which must write
    the reference's bytes. Importing `cachegen_vllm.kernels.rans_coder` registers the Triton coder
    for CUDA; a device with none uses the torch reference, which runs anywhere."""
    _CODERS[device_type] = coder


def coder_for(device: torch.device) -> RansCoder:
    return _CODERS.get(device.type, REFERENCE_CODER)


def lanes_of(count: int, lane_symbols: int) -> tuple[int, int]:
    """(lanes, steps) for ``count`` codes at most ``lane_symbols`` per lane."""
    lanes = rans_lanes(count, lane_symbols)
    return lanes, -(-count // lanes)


def alphabet_bits(bits: int, basis: bool) -> int:
    """The symbol alphabet (``2**(a+1)`` symbols, bank ``a``) of a ``bits``-wide tensor. A
    calibrated basis concentrates the variance: its largest coefficients lie far beyond the
    +-4.1 sigma that ``2**bits`` steps span (research/basis_study.py measures how far), so its
    alphabet is 16 times wider, up to the widest bank (which limits basis profiles to 5 bits)."""
    return min(bits + 4, max(BANK_DIGESTS)) if basis else bits


def quantize(
    x: torch.Tensor, bits: int, alphabet: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: fp32 [tokens, channels]; ``alphabet``: `alphabet_bits` (default ``bits``). Returns
    (symbols int64 [tokens, channels], centers fp16 [channels], step fp32 [1]), with no host read.
    Non-finite ``x`` gives meaningless but in-range symbols (the caller sends such tensors exact)."""
    tokens, count = x.shape[0], x.numel()
    e = fixed_point_exponent(x)
    scale = power_of_two(e).float()
    sums = torch.round(x * scale).to(torch.int64).sum(0)
    centers = (sums.to(torch.float32) / float(tokens) * power_of_two(-e).float()).to(torch.float16)
    deviation = x - centers.float()
    d = torch.round(deviation * scale).to(torch.int64)
    squares = (d * d).sum().reshape(1)
    sigma = torch.sqrt(squares.to(torch.float32) / float(count))
    step = torch.where(squares > 0, (sigma * GAIN) * power_of_two(-e - bits).float(), power_of_two(-e).float())
    half = 1 << (bits if alphabet is None else alphabet)
    q = torch.floor(deviation / step + 0.5).nan_to_num_(0.0).clamp_(-half, half - 1)
    return q.to(torch.int64) + half, centers, step


def dequantize(symbols: torch.Tensor, centers: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 [tokens, channels] from `quantize`'s outputs."""
    return (symbols - (1 << bits)).to(torch.float32) * step + centers.float()


def choose_tables(symbols: torch.Tensor, bits: int) -> torch.Tensor:
    """For each channel, the bank table that codes its symbols [tokens, channels] in the fewest
    bits: uint8 [channels]. Costs are integers summed in float64 (exact below 2**53)."""
    _, costs = _bank_on(bits, symbols.device)
    counts = torch.zeros((symbols.shape[1], costs.shape[1]), dtype=torch.float64, device=symbols.device)
    counts.scatter_add_(1, symbols.T, torch.ones(symbols.T.shape, dtype=torch.float64, device=symbols.device))
    return torch.argmin(counts @ costs.T.to(torch.float64), dim=1).to(torch.uint8)


@dataclass(frozen=True)
class Lanes:
    """A tensor's rANS lanes as they travel."""

    states: torch.Tensor  # uint32 [lanes]: final encoder states
    lane_words: torch.Tensor  # uint16 [lanes]: 16-bit words of each lane's stream
    stream: torch.Tensor  # uint16 [words]: the lanes' streams back to back


@dataclass(frozen=True)
class Coded:
    """What decoding one tensor needs."""

    lanes: Lanes
    tables: torch.Tensor  # uint8 [channels]
    bits: int
    shape: tuple[int, int]  # (tokens, channels)
    lane_symbols: int


def _lane_grid(count: int, lane_symbols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code index [steps, lanes], real code?) of each lane step; padding steps index code 0."""
    lanes, steps = lanes_of(count, lane_symbols)
    index = torch.arange(steps * lanes, device=device).view(steps, lanes)
    active = index < count
    return torch.where(active, index, 0), active


def _padded(grids: list[torch.Tensor], fill: int) -> torch.Tensor:
    """[steps, lanes] grids side by side, the shorter ones extended with ``fill`` steps."""
    steps = max(g.shape[0] for g in grids)
    return torch.cat([torch.nn.functional.pad(g, (0, 0, 0, steps - g.shape[0]), value=fill) for g in grids], dim=1)


def encode_grids(tensors: list[tuple[torch.Tensor, torch.Tensor, int]], lane_symbols: int):
    """The coder's input for `encode`: (frequencies [steps, lanes], cumulative starts [steps,
    lanes], lanes of each tensor)."""
    freqs, starts, lane_counts = [], [], []
    for symbols, tables, bits in tensors:
        cum, _ = _bank_on(bits, symbols.device)
        index, active = _lane_grid(symbols.numel(), lane_symbols, symbols.device)
        rows = tables.long()[index % symbols.shape[1]]
        code = symbols.reshape(-1)[index]
        lo, hi = cum[rows, code], cum[rows, code + 1]
        freqs.append(torch.where(active, hi - lo, rans.PROB_SCALE))
        starts.append(torch.where(active, lo, 0))
        lane_counts.append(index.shape[1])
    return _padded(freqs, rans.PROB_SCALE), _padded(starts, 0), lane_counts


@dataclass(frozen=True)
class LaneBatch:
    """Several tensors' lanes, coded in one pass, still on their device: `word_totals` says how many
    stream words each has, and `lanes` cuts them apart once the host has read those totals."""

    states: torch.Tensor  # int64 [lanes], all tensors' lanes side by side
    lane_words: torch.Tensor  # int64 [lanes]
    stream: torch.Tensor  # int64: the lanes' words back to back, then unused room
    lane_counts: list[int]  # lanes of each tensor

    def word_totals(self) -> torch.Tensor:
        """int64 [tensors]: stream words of each tensor, on the device."""
        counts = torch.tensor(self.lane_counts, device=self.lane_words.device)
        ends = torch.cumsum(counts, 0)
        cumulative = torch.nn.functional.pad(torch.cumsum(self.lane_words, 0), (1, 0))
        return cumulative[ends] - cumulative[ends - counts]

    def arrays(self, totals: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each tensor's lanes as they travel, given `word_totals` read on the host: uint8 views of
        the states (uint32 each), words per lane (uint16) and stream (uint16), on the device. The
        low bytes of the int64 values, little-endian as the format is: no narrow integer types on
        the device."""
        out, lane, word = [], 0, 0
        for lanes, total in zip(self.lane_counts, totals):
            out.append(
                (
                    low_bytes(self.states[lane : lane + lanes], 4),
                    low_bytes(self.lane_words[lane : lane + lanes], 2),
                    low_bytes(self.stream[word : word + total], 2),
                )
            )
            lane, word = lane + lanes, word + total
        return out


def encode(tensors: list[tuple[torch.Tensor, torch.Tensor, int]], lane_symbols: int) -> LaneBatch:
    """rANS-code several tensors at once, each ``(symbols [tokens, channels], table ids [channels],
    bits)``, their lanes side by side (one pass of steps for all), with no host read."""
    freq, start, lane_counts = encode_grids(tensors, lane_symbols)
    states, stream, lane_words = coder_for(freq.device).encode(freq, start)
    return LaneBatch(states, lane_words, stream, lane_counts)


def decode_grids(tensors: list[Coded]) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """The coder's input for `decode` (states, stream, words per lane, cumulative rows, row starts,
    row of each step, active steps) and each tensor's active-step grid."""
    device = tensors[0].lanes.states.device
    tables, starts, rows, actives, base, offset = [], [], [], [], 0, 0
    for t in tensors:
        tokens, channels = t.shape
        cum, _ = _bank_on(t.bits, device)
        tables.append(cum[t.tables.long()].reshape(-1))  # each channel's row of cumulative frequencies
        starts.append(offset + torch.arange(channels, device=device) * cum.shape[1])
        index, active = _lane_grid(tokens * channels, t.lane_symbols, device)
        rows.append(base + index % channels)
        actives.append(active)
        base, offset = base + channels, offset + channels * cum.shape[1]

    def cat(field: str) -> torch.Tensor:
        return torch.cat([getattr(t.lanes, field).to(torch.int64) for t in tensors])

    args = (
        cat("states"),
        cat("stream"),
        cat("lane_words"),
        torch.cat(tables),
        torch.cat(starts),
        _padded(rows, 0),
        _padded(actives, False),
    )
    return args, actives


def decode(tensors: list[Coded]) -> list[torch.Tensor]:
    """Symbols, int64 [tokens, channels], of tensors that `encode` coded, all lanes in one pass.
    rans.RansError if a stream is corrupted."""
    args, actives = decode_grids(tensors)
    symbols = coder_for(args[0].device).decode(*args)
    out, lane = [], 0
    for t, grid in zip(tensors, actives):
        steps, lanes = grid.shape
        codes = symbols[:steps, lane : lane + lanes].reshape(-1)  # step-major is code order
        out.append(codes[: t.shape[0] * t.shape[1]].view(t.shape))
        lane += lanes
    return out

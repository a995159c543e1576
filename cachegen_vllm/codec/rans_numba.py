"""rANS lanes compiled for the CPU (numba): the coder a CPU producer or consumer runs.

The same integer steps as `cachegen_vllm.codec.rans` (the torch reference, one tensor operation
per step for all lanes) and `kernels/rans_coder.py` (Triton, a thread per lane): here each lane runs
its own compiled loop, so the states, words and symbols are identical (tested). The torch loop pays
a Python step per code of a lane, whatever the number of lanes, which is too slow for serving.
`encode` and `decode` take and return what the torch functions do. numba comes with vLLM.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from cachegen_vllm.codec.rans import PROB_BITS, PROB_SCALE, STATE_LOWER, WORD_BITS, RansError

_MASK = (1 << WORD_BITS) - 1


@numba.njit(cache=True, nogil=True)
def _encode(freq, cum):
    lanes, steps = freq.shape  # lane-major: a lane's steps are contiguous
    states = np.empty(lanes, np.int64)
    counts = np.zeros(lanes, np.int64)
    reversed_words = np.empty((lanes, steps), np.int64)  # each lane's words as emitted (last step first)
    for j in range(lanes):
        x = STATE_LOWER
        n = 0
        for i in range(steps - 1, -1, -1):
            f = freq[j, i]
            if x >= (f << WORD_BITS):
                reversed_words[j, n] = x & _MASK
                n += 1
                x >>= WORD_BITS
            x = ((x // f) << PROB_BITS) + x % f + cum[j, i]
        states[j] = x
        counts[j] = n
    stream = np.empty(counts.sum(), np.int64)
    at = 0
    for j in range(lanes):  # the decoder reads a lane's words first step first
        for k in range(counts[j]):
            stream[at + k] = reversed_words[j, counts[j] - 1 - k]
        at += counts[j]
    return states, stream, counts


@numba.njit(cache=True, nogil=True)
def _decode(states, stream, lane_words, cum, row_start, rows, active, out):
    """Fills ``out`` [lanes, steps] (lane-major, as ``rows`` and ``active``); returns False if a lane
    does not end exactly (corruption)."""
    lanes, steps = rows.shape
    rows_count = row_start.shape[0]
    begin = 0
    for j in range(lanes):
        end = begin + lane_words[j]
        ptr = begin
        x = states[j]
        for i in range(steps):
            if not active[j, i]:
                out[j, i] = 0
                continue
            r = rows[j, i]
            lo_index = row_start[r]
            hi_index = row_start[r + 1] if r + 1 < rows_count else cum.shape[0]
            slot = x & (PROB_SCALE - 1)
            a, b = lo_index, hi_index - 1  # the last s with cum[s] <= slot, s in [lo, hi - 1)
            while b - a > 1:
                mid = (a + b) >> 1
                if cum[mid] <= slot:
                    a = mid
                else:
                    b = mid
            x = (cum[a + 1] - cum[a]) * (x >> PROB_BITS) + slot - cum[a]
            if x < STATE_LOWER:
                if ptr >= end:
                    return False
                x = (x << WORD_BITS) | stream[ptr]
                ptr += 1
            out[j, i] = a - lo_index
        if ptr != end or x != STATE_LOWER:
            return False
        begin = end
    return True


def encode(freq: torch.Tensor, cum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cachegen_vllm.codec.rans.encode`, compiled."""
    states, stream, counts = _encode(np.ascontiguousarray(freq.numpy().T), np.ascontiguousarray(cum.numpy().T))
    return torch.from_numpy(states), torch.from_numpy(stream), torch.from_numpy(counts)


def decode(states, stream, lane_words, cum, row_start, rows, active) -> torch.Tensor:
    """`cachegen_vllm.codec.rans.decode`, compiled. RansError if a lane does not end exactly."""
    # The compiled loop reads stream[ptr] without bounds checks (ptr stays below each lane's end):
    # word counts beyond the stream must be refused here, whatever the caller checked.
    if int(lane_words.sum()) != stream.numel():
        raise RansError("an entropy-coded lane does not decode to its end: the stream is corrupted")
    out = np.empty((rows.shape[1], rows.shape[0]), np.int64)
    flat = (np.ascontiguousarray(t.numpy()) for t in (states, stream, lane_words, cum, row_start))
    if not _decode(*flat, np.ascontiguousarray(rows.numpy().T), np.ascontiguousarray(active.numpy().T), out):
        raise RansError("an entropy-coded lane does not decode to its end: the stream is corrupted")
    return torch.from_numpy(out.T)

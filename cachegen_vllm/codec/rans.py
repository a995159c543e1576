"""rANS entropy coding of many independent lanes at once, in plain torch (CPU and CUDA tensors).

The coder of docs/FORMAT.md: a 32-bit state, 16-bit renormalization words and 16-bit
probabilities (frequencies out of 2**16, ryg_rans' 32/16 variant, which DietGPU also runs). Each lane
is one stream: its symbols are coded one after the other, but lanes share nothing, so a whole frame's
lanes advance together, one tensor operation per step here and one thread per lane in a kernel.

Encoding runs a lane's symbols last to first, starting from the state ``STATE_LOWER``; before a
symbol whose frequency is ``f``, a state ``x >= f << 16`` emits its low 16 bits. The decoder runs
first to last from the final state and reads those words back in the opposite order, so a lane's
stream is its emitted words sorted by the symbol that emitted them, ascending. A decoder that has
read exactly the lane's words and is back at ``STATE_LOWER`` has decoded what was encoded; anything
else is corruption.

A step with frequency ``PROB_SCALE`` (cumulative 0) leaves the state unchanged and emits nothing:
lanes of unequal length are padded with such steps.
"""

from __future__ import annotations

import torch

PROB_BITS = 16
PROB_SCALE = 1 << PROB_BITS
STATE_LOWER = 1 << 16  # states live in [STATE_LOWER, STATE_LOWER << WORD_BITS)
WORD_BITS = 16
_WORD_MASK = (1 << WORD_BITS) - 1


class RansError(ValueError):
    """A stream does not decode to the end it must reach."""


def encode(freq: torch.Tensor, cum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Code ``steps x lanes`` symbols given as their frequencies and cumulative frequencies (int64,
    step-major). Returns (final states [lanes], the lanes' streams back to back and then unused
    words (`compact_lanes`), words per lane [lanes]), int64 each."""
    steps, lanes = freq.shape
    x = torch.full((lanes,), STATE_LOWER, dtype=torch.int64, device=freq.device)
    words = torch.empty((steps, lanes), dtype=torch.int64, device=freq.device)
    emitted = torch.empty((steps, lanes), dtype=torch.bool, device=freq.device)
    for i in range(steps - 1, -1, -1):
        f = freq[i]
        emit = x >= (f << WORD_BITS)
        words[i] = x & _WORD_MASK
        emitted[i] = emit
        x = torch.where(emit, x >> WORD_BITS, x)
        x = ((x // f) << PROB_BITS) + x % f + cum[i]
    return x, *compact_lanes(words, emitted)


def compact_lanes(words: torch.Tensor, emitted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The emitted words of a [steps, lanes] grid, lane by lane, each lane's by ascending step (the
    decoder's reading order), and the words per lane. The stream has room for every word of the
    grid, its first ``lane_words.sum()`` hold the lanes' streams: placing them by a scatter, not a
    boolean index, keeps the host from waiting for the total on a GPU."""
    lane_words = emitted.sum(0)
    first = torch.cumsum(lane_words, 0) - lane_words  # each lane's first word in the stream
    rank = torch.cumsum(emitted, 0, dtype=torch.int64) - 1  # each word's place in its lane
    slots = words.numel()
    at = torch.where(emitted, first[None, :] + rank, slots)  # words not emitted go to a spare slot
    stream = torch.zeros(slots + 1, dtype=words.dtype, device=words.device)
    stream.scatter_(0, at.reshape(-1), words.reshape(-1))
    return stream[:slots], lane_words


def decode(
    states: torch.Tensor,
    stream: torch.Tensor,
    lane_words: torch.Tensor,
    cum: torch.Tensor,
    row_start: torch.Tensor,
    rows: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """Symbols ``[steps, lanes]`` (int64) of lanes whose final states and streams (back to back, the
    lengths in ``lane_words``) `encode` made. The tables are rows of cumulative frequencies, each
    from 0 to PROB_SCALE, concatenated in ``cum`` (row r starts at ``row_start[r]``); ``rows[i]`` is
    the row each lane codes its step i with. ``active`` [steps, lanes] marks real symbols; others
    are padding and decode as 0. Raises RansError unless every lane ends exactly at its last word
    and at STATE_LOWER."""
    lanes, steps = states.numel(), rows.shape[0]
    device = states.device
    # Row r shifted by r << 17 makes all rows one ascending array: a symbol is one searchsorted.
    shift = (PROB_SCALE << 1).bit_length() - 1
    owner = torch.repeat_interleave(
        torch.arange(row_start.numel(), device=device),
        torch.diff(torch.cat([row_start, torch.tensor([cum.numel()], device=device)])),
    )
    keyed = cum + (owner << shift)
    end = torch.cumsum(lane_words, 0)
    ptr = end - lane_words
    x = states.clone()
    padded = torch.cat([stream, torch.zeros(1, dtype=torch.int64, device=device)])  # a read past the end lands here
    last = padded.numel() - 1
    out = torch.zeros((steps, lanes), dtype=torch.int64, device=device)
    for i in range(steps):
        row, live = rows[i], active[i]
        slot = x & (PROB_SCALE - 1)
        at = torch.searchsorted(keyed, (row << shift) + slot, right=True) - 1
        lo = cum[at]
        y = (cum[at + 1] - lo) * (x >> PROB_BITS) + slot - lo
        need = (y < STATE_LOWER) & live
        word = padded[torch.minimum(ptr, end).clamp_max(last)]
        x = torch.where(need, (y << WORD_BITS) | word, torch.where(live, y, x))
        ptr += need
        out[i] = torch.where(live, at - row_start[row], 0)
    if not bool(((ptr == end) & (x == STATE_LOWER)).all()):
        raise RansError("an entropy-coded lane does not decode to its end: the stream is corrupted")
    return out

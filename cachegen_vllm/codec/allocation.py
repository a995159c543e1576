"""Bit allocation: which tokens of which layer get how many bits.

A layer's base widths come from the profile (`Profile.layer_bits`); the newest tokens of a request
keep at least the widths of every recent-token tier they fall in, and its first tokens those of
every sink tier (the attention sinks: a few exact tokens at the start keep the first group's
statistics from stretching to their outliers). Recent distance is counted from the end of the
request's prompt (the tokens the producer has), so the same token gets the same width in every
frame that carries it. A frame's tokens are split into runs ("segments") of equal widths, and the
frame records them: decoding never needs the profile.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from cachegen_vllm.codec.geometry import KV
from cachegen_vllm.codec.profile import Profile


@dataclass(frozen=True)
class Segment:
    """A run of a frame's tokens coded at the same (key, value) widths."""

    tokens: int
    key_bits: int
    value_bits: int

    def bits(self, tensor: KV) -> int:
        return self.key_bits if tensor == KV.KEY else self.value_bits


def token_widths(profile: Profile, layer: int, position: int, total_tokens: int) -> tuple[int, int]:
    """(key, value) widths of the token at ``position`` in a request of ``total_tokens``."""
    key, value = profile.layer_bits(layer)
    distance = total_tokens - 1 - position
    tiers = [t for t in profile.recent if distance < t.tokens] + [t for t in profile.sink if position < t.tokens]
    for tier in tiers:
        key, value = max(key, tier.key), max(value, tier.value)
    return key, value


def plan_segments(profile: Profile, layer: int, start: int, count: int, total_tokens: int) -> list[Segment]:
    """Runs of equal widths covering tokens ``[start, start + count)``."""
    end = start + count
    edges = {total_tokens - t.tokens for t in profile.recent} | {t.tokens for t in profile.sink}
    cuts = sorted({start, end} | {e for e in edges if start < e < end})
    segments: list[Segment] = []
    for lo, hi in itertools.pairwise(cuts):
        widths = token_widths(profile, layer, lo, total_tokens)
        if segments and (segments[-1].key_bits, segments[-1].value_bits) == widths:
            segments[-1] = Segment(segments[-1].tokens + hi - lo, *widths)
        else:
            segments.append(Segment(hi - lo, *widths))
    return segments


def chunk_bounds(profile: Profile, start: int, count: int) -> list[tuple[int, int]]:
    """(start, count) of each frame for tokens ``[start, start + count)``.

    Chunks are aligned to absolute multiples of ``chunk_tokens`` so that a prefix the consumer
    already holds maps to whole frames it can skip.
    """
    step = profile.chunk_tokens
    bounds, pos, end = [], start, start + count
    while pos < end:
        nxt = min(end, (pos // step + 1) * step)
        bounds.append((pos, nxt - pos))
        pos = nxt
    return bounds


def covering_token_counts(profile: Profile) -> list[int]:
    """Prompt lengths whose tokens, between them, get every pair of widths a layer of this profile
    can give a token: a token's tiers depend on its position (sink tiers) and on its distance from
    the prompt's end (recent tiers) independently, so a prompt of ``p + d + 1`` tokens holds, at
    position ``p``, a token at distance ``d``, for the first position and distance of each interval
    between tier edges."""
    positions = sorted({0} | {t.tokens for t in profile.sink})
    distances = sorted({0} | {t.tokens for t in profile.recent})
    return sorted({p + d + 1 for p in positions for d in distances})

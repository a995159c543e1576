"""Choosing how hard to compress, from measured rates (CacheGen's bandwidth adaptation).

A producer holds a ladder of profiles, least compressed first, the last one its quality floor.
Before it encodes a layer of a request, it asks which level would have the decode hold the
request's last frame soonest if this layer and the ones still to come went at that level. Two
stages bound that time, and each level trades one against the other:

    production:  the prefill makes each remaining layer (R / P seconds for R raw bytes at P bytes/s)
                 and the encoder codes it (R / E_l); on a CPU producer the encoding holds the forward
                 pass (the two add up), on a GPU it runs on its own stream (the slower one paces);
                 the last layer's frames then cross the link (R c_l / G);
    link:        from when this layer's frames are ready and the bytes already queued have gone
                 (B / G), every remaining layer's wire bytes cross at the goodput G (R c_l / G each).

    finish_l = max(production_l, link_l)        c_l: the level's wire bytes per raw byte

A fast link makes the link term small and the cheapest encoder (raw) wins; a slow one makes it
dominate and the smallest frames win, down to the floor. A more compressed level must beat the
less compressed ones by more than `SLACK` (a relative and an absolute part): quality is not spent
for a gain nobody would notice, or that the estimates' noise makes up.
The decode side's counterpart, `should_recompute`, compares the transfer with its own prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SLACK = (0.02, 0.001)  # a level within 2% + 1 ms of the best estimate counts as good as it


@dataclass(frozen=True)
class Level:
    """One rung of the ladder, as measured so far."""

    name: str
    wire_ratio: float  # wire bytes per raw byte
    encode_bytes_per_s: float  # raw bytes the encoder codes per second (inf: free)


@dataclass(frozen=True)
class Conditions:
    """What the producer measures, and how its encoder shares the prefill's compute."""

    link_bytes_per_s: float  # goodput: bytes the decode has acknowledged per second of a busy link
    backlog_bytes: float  # queued for the link and not acknowledged yet, all transfers
    production_bytes_per_s: float  # raw KV bytes the prefill's forward pass makes per second (inf: unknown)
    encode_holds_compute: bool  # the encoding runs on the forward pass's thread (a CPU producer)


def finish_seconds(level: Level, layer_bytes: float, layers_left: int, now: Conditions) -> float:
    """Seconds until the decode holds the last frame if ``layers_left`` layers of ``layer_bytes``
    raw bytes each (this one included) all go at ``level``."""
    encode = layer_bytes / level.encode_bytes_per_s
    make = layer_bytes / now.production_bytes_per_s
    wire = layer_bytes * level.wire_ratio / now.link_bytes_per_s
    per_layer = make + encode if now.encode_holds_compute else max(make, encode)
    production = (layers_left - 1) * per_layer + encode + wire
    link = max(encode, now.backlog_bytes / now.link_bytes_per_s) + layers_left * wire
    return max(production, link)


def choose(levels: list[Level], layer_bytes: float, layers_left: int, now: Conditions) -> tuple[int, list[float]]:
    """The index of the least compressed level that finishes as soon as the best (within `SLACK`),
    and every level's estimate."""
    if not levels or layers_left < 1:
        raise ValueError(f"choose needs levels and layers_left >= 1; got {len(levels)} levels, {layers_left}")
    estimates = [finish_seconds(level, layer_bytes, layers_left, now) for level in levels]
    good_enough = min(estimates) * (1 + SLACK[0]) + SLACK[1]
    return next(i for i, estimate in enumerate(estimates) if estimate <= good_enough), estimates


def should_recompute(kv_tokens_per_s: float, prefill_tokens_per_s: float) -> bool:
    """The decode's fallback, CacheGen's fall-back-to-text in P/D terms: recompute the prompt where
    its KV would reach the decode slower than the decode computes it. The KV arrives as fast as the
    slower of the prefill making it and the link carrying it (they overlap), and both sides' times
    grow with the tokens missing, so the rule compares rates: `kv_tokens_per_s` (the producer's
    `kv_tokens_per_s`) against the decode's own prefill tokens per second."""
    return kv_tokens_per_s < prefill_tokens_per_s


def kv_tokens_per_s(
    link_bytes_per_s: float | None,
    wire_bytes_per_token: float,
    production_bytes_per_s: float | None,
    raw_bytes_per_token: float,
) -> float | None:
    """Prompt tokens per second at which a producer's KV reaches a decode: the slower of its making
    (raw bytes per second of the forward pass) and its crossing (the goodput over the wire bytes
    per token at the recent sizes); None where neither is measured."""
    rates = []
    if link_bytes_per_s:
        rates.append(link_bytes_per_s / wire_bytes_per_token)
    if production_bytes_per_s:
        rates.append(production_bytes_per_s / raw_bytes_per_token)
    return min(rates) if rates else None


class Ewma:
    """An exponentially weighted mean of samples; None before the first."""

    def __init__(self, weight: float = 0.3, value: float | None = None):
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1]; got {weight}")
        self.weight, self.value = weight, value

    def update(self, sample: float) -> None:
        if not math.isfinite(sample) or sample <= 0:
            return  # a rate of zero or infinity says nothing about the next layer
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)


class Adapter:
    """One producer rank's measurements and choices: per level, its encode rate and wire ratio
    (moving means that start from the start-up estimates, so that one request's outlier, such as a
    tiny prompt's fixed costs, moves a level's rate without replacing it); the prefill's KV production rate; the link's
    goodput, fixed by configuration or as the transport measures it (until it has, the link counts
    as fast: the first frames go light, and the credits they bring back measure the link)."""

    def __init__(
        self,
        names: list[str],
        priors: list[tuple[float, float]],  # per level: (encode bytes per second, wire ratio)
        encode_holds_compute: bool,
        fixed_link_bytes_per_s: float | None = None,
    ):
        self.names, self.priors = names, priors
        self.encode_holds_compute = encode_holds_compute
        self.fixed_link_bytes_per_s = fixed_link_bytes_per_s
        self._encode = [Ewma(value=rate if math.isfinite(rate) else None) for rate, _ in priors]
        self._ratio = [Ewma(value=ratio) for _, ratio in priors]
        self._production = Ewma()

    def encoded(self, level: int, raw_bytes: int, wire_bytes: int, seconds: float) -> None:
        if raw_bytes > 0 and seconds > 0:
            self._encode[level].update(raw_bytes / seconds)
            self._ratio[level].update(wire_bytes / raw_bytes)

    def produced(self, raw_bytes: int, seconds: float) -> None:
        if seconds > 0:
            self._production.update(raw_bytes / seconds)

    @property
    def production_bytes_per_s(self) -> float | None:
        return self._production.value

    def levels(self) -> list[Level]:
        return [
            Level(name, ratio.value if ratio.value is not None else prior[1], encode.value or prior[0])
            for name, prior, encode, ratio in zip(self.names, self.priors, self._encode, self._ratio, strict=True)
        ]

    def conditions(self, measured_link_bytes_per_s: float | None, backlog_bytes: float) -> Conditions:
        link = self.fixed_link_bytes_per_s or measured_link_bytes_per_s or math.inf
        production = self._production.value or math.inf
        return Conditions(link, backlog_bytes, production, self.encode_holds_compute)

    def choose(self, layer_bytes: float, layers_left: int, now: Conditions) -> int:
        return choose(self.levels(), layer_bytes, layers_left, now)[0]

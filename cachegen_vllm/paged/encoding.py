"""A step's saves encoded layer by layer (`EncodeStep`): the tokens each request computed this step,
read from its blocks as soon as a layer's attention has written them, into frames.

`EncodeStep.start` runs on the forward pass's thread and only enqueues, on the current stream:
the Triton kernels code every save of the layer in one launch per pair of widths (their tiles
index one block table for the whole step), into one frame buffer, copied to pinned host memory;
the reference codec's inputs (every frame on a CPU cache, entropy-coded, fp8 and lossless frames
on either) are gathered from the blocks there and then. Nothing reads a request's blocks after
the step, so blocks vLLM frees on a preemption can be reused at once; the one exception, a frame
the kernels' statistics cannot hold (made the reference's way when sealed), is waited for by
`Saving.preempted`. `LayerEncode.frames`, on the sealer, makes each save's frames from what
`start` left. What waits for the sealer is bounded by the runtime's `Staging`.

`encode` makes one save's frames here and now; `warm_up` and `time_encode` run at start-up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from cachegen_vllm.codec import Profile, encode_chunk, encode_layer, read_frame
from cachegen_vllm.codec.allocation import covering_token_counts
from cachegen_vllm.codec.format import FrameHeader
from cachegen_vllm.device import Hold
from cachegen_vllm.paged.caches import PagedCaches, kernels_take
from cachegen_vllm.paged.layout import gather, kernel_block_ids

if TYPE_CHECKING:
    from cachegen_vllm.kernels.plans import EncodePlan


@dataclass(frozen=True)
class SaveRange:
    """Tokens ``[start, end)`` of a prompt of ``total`` tokens, in the request's blocks
    (``block_ids``: vLLM's block manager's, in order)."""

    block_ids: Sequence[int]
    start: int
    end: int
    total: int


def _closed(i: int) -> list[bytes]:
    raise RuntimeError("this layer's encoding was closed")


class LayerEncode:
    """One layer of a step's saves on their way: `frames` makes save ``i``'s (waiting first for
    the copies `EncodeStep.start` enqueued); `close` lets go of the memory they held."""

    def __init__(self, frames: Callable[[int], list[bytes]], hold: Hold, caches: PagedCaches):
        self._frames, self._caches = frames, caches
        self._hold: Hold | None = hold

    def frames(self, i: int) -> list[bytes]:
        return self._frames(i)

    def close(self) -> None:
        self._frames = _closed  # and with it what it read from (a reference encode's inputs)
        if self._hold is not None:
            self._caches.runtime.staging.let_go(self._hold)
            self._hold = None


class EncodeStep:
    """The saves (``ranges``) of one step of ``caches``; their block table goes to the device now,
    on the current stream."""

    def __init__(self, caches: PagedCaches, ranges: Sequence[SaveRange]):
        self.caches, self.ranges = caches, list(ranges)
        self.entries: list[int] = []  # where each save's blocks start in the step's table
        ids: list[int] = []
        for r in self.ranges:
            self.entries.append(len(ids))
            ids += kernel_block_ids(r.block_ids, caches.per_block)
        self.table = caches.runtime.to_device(np.array(ids, dtype=np.int64))
        self._plans: dict[tuple[Profile, object], EncodePlan] = {}  # by (profile, the layer's widths)

    def start(self, layer: int, profile: Profile) -> LayerEncode:
        """Enqueue the layer's encoding of every save on the current stream (which must be ordered
        after the layer's cache writes); waits first while the sealer holds too much."""
        caches = self.caches
        widths = {w for _, w in profile.widths()}
        if (
            caches.kernels
            and profile.coding == "packed"
            and kernels_take(caches.geometry, profile.group_tokens, widths)
        ):
            return self._start_kernels(layer, profile)
        return self._start_reference(layer, profile)

    def _blocks(self, i: int) -> torch.Tensor:
        """Save ``i``'s blocks: its part of the step's table."""
        r = self.ranges[i]
        count = -(-r.end // self.caches.block_tokens) * self.caches.per_block
        return self.table[self.entries[i] : self.entries[i] + count]

    def _start_kernels(self, layer: int, profile: Profile) -> LayerEncode:
        from cachegen_vllm.kernels import plans  # Triton: imported only where the kernels run

        caches = self.caches
        runtime, geometry = caches.runtime, caches.geometry
        key = (profile, profile.layer_bits(layer))
        plan = self._plans.get(key)
        if plan is None:  # once per step and widths: every layer of those widths has this layout
            spans = [plans.SaveSpan(e, r.start, r.end, r.total) for e, r in zip(self.entries, self.ranges)]
            plan = self._plans[key] = plans.plan_encode(geometry, profile, layer, spans, caches.device, runtime)
        hold = runtime.staging.hold(plan.nbytes, host=True)
        buffer = runtime.frame_buffer(plan.nbytes)
        plans.launch_encode(plan, caches.layers[layer], self.table, buffer)
        runtime.note("launches", len(plan.launches))
        host = runtime.to_host(buffer, hold)
        copied = runtime.mark()
        sealed: list[list[memoryview | None]] = []

        def frames(i: int) -> list[bytes]:
            if not sealed:
                runtime.wait(copied)
                sealed.extend(plans.finish_encode(plan, geometry, layer, host))
            return [
                bytes(frame) if frame is not None else self._reference_frame(layer, i, plan.headers[f], profile)
                for frame, f in zip(sealed[i], plan.saves[i])
            ]

        return LayerEncode(frames, hold, caches)

    def _reference_frame(self, layer: int, i: int, header: FrameHeader, profile: Profile) -> bytes:
        """The reference codec's frame for the tokens and segments of ``header`` in save ``i``, on
        the CPU (a frame the kernels' statistics cannot hold). It reads the blocks when sealed."""
        caches = self.caches
        end = header.token_start + header.token_count
        key, value = gather(caches.layers[layer], None, self._blocks(i), end, header.token_start)
        return encode_chunk(
            key.cpu(),
            value.cpu(),
            geometry=caches.geometry,
            profile=profile,
            layer=layer,
            token_start=header.token_start,
            segments=list(header.segments),
            scales=caches.scales(layer),
        )

    def _start_reference(self, layer: int, profile: Profile) -> LayerEncode:
        caches = self.caches
        geometry, staging = caches.geometry, caches.runtime.staging
        cache, basis = caches.layers[layer], caches.bases.for_profile(profile)
        # one hold for the layer: held save by save, saves past the bound would wait for themselves
        hold = staging.hold(sum(geometry.layer_bytes(r.end - r.start) for r in self.ranges))
        inputs = []
        for i, r in enumerate(self.ranges):  # gathered now, in the step: the blocks may be reused after it
            key, value = gather(cache, caches.order, self._blocks(i), r.end, r.start)
            inputs.append(tuple(t.view(geometry.dtype) for t in (key, value)))  # fp8: vLLM's uint8 pages

        def frames(i: int) -> list[bytes]:
            key, value = inputs[i]
            r = self.ranges[i]
            return encode_layer(
                key,
                value,
                geometry=geometry,
                profile=profile,
                layer=layer,
                token_start=r.start,
                total_tokens=r.total,
                scales=caches.scales(layer),
                basis=basis,
            )

        return LayerEncode(frames, hold, caches)


def encode(caches: PagedCaches, layer: int, profile: Profile, save: SaveRange) -> list[bytes]:
    """One save's frames of one layer, made here and now."""
    encoding = EncodeStep(caches, [save]).start(layer, profile)
    try:
        return encoding.frames(0)
    finally:
        encoding.close()


def warm_up(caches: PagedCaches, profile: Profile) -> None:
    """Take every path requests of ``profile`` take once, at start-up, so that the first ones
    compile nothing: each Triton kernel variant it launches (one per pair of widths), the rANS
    coders (numba's on a CPU). Encodes from the caches' first block and decodes into no token."""
    layers = {profile.layer_bits(layer): layer for layer in sorted(caches.layers, reverse=True)}.values()
    totals = covering_token_counts(profile)
    block_ids = _first_block_repeated(caches, max(totals))
    table = caches.block_table(block_ids)
    for layer in layers:
        for total in totals:
            frames = encode(caches, layer, profile, SaveRange(block_ids, 0, total, total))
            caches.decode([read_frame(f) for f in frames], table, 0, 0)


def time_encode(
    caches: PagedCaches, profile: Profile, tokens: int, runs: int = 3, budget_s: float = 0.02
) -> tuple[float, int]:
    """(seconds, wire bytes) of encoding ``tokens`` tokens of the first layer read from the caches'
    first block, repeated: a start-up estimate of the profile's encode rate and size, before any
    request has measured them (run after `warm_up`, so that nothing compiles here). The fastest of
    ``runs`` runs or more (within ``budget_s``, 50 at most): other processes starting on the same
    cores only add time, and adaptation never measures again a level it does not pick."""
    save = SaveRange(_first_block_repeated(caches, tokens), 0, tokens, tokens)
    best, spent, done = math.inf, 0.0, 0
    while done < runs or (spent < budget_s and done < 50):
        started = time.perf_counter()
        frames = encode(caches, min(caches.layers), profile, save)
        took = time.perf_counter() - started
        best, spent, done = min(best, took), spent + took, done + 1
    return best, sum(map(len, frames))


def _first_block_repeated(caches: PagedCaches, tokens: int) -> list[int]:
    """Block ids (vLLM's block manager's) for ``tokens`` tokens that read the caches' first block
    for all of them."""
    return [0] * -(-tokens // caches.block_tokens)

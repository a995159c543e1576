"""The codec on vLLM's paged cache: a layer's tokens in a request's blocks to frames
(`start_encode`, then `PendingEncode.finish`; `encode_blocks` does both) and frames back into
blocks (`decode_frames_into_blocks`, a layer's frames in one batch; `decode_into_blocks` for one).
The Triton kernels (`cachegen_vllm.kernels`) code bit-packed frames on a CUDA cache; the reference
codec does the rest: every frame on a CPU cache, entropy-coded frames on either, and a frame whose
values the kernels' float16 statistics cannot hold (sent exact, as the reference does).

Encoding is split so that the forward pass never waits for it: `start_encode` enqueues the kernels
and the copy of their output to the host on the current stream and returns at once; `finish`,
once that copy is complete, seals the frames (on the host) or, for the reference codec, does the
whole encoding (device work and the host's reads) wherever the caller runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cachegen_vllm.codec import KVGeometry, Profile, decode_frames, encode_chunk, encode_layer
from cachegen_vllm.codec.allocation import covering_token_counts
from cachegen_vllm.codec.basis import Basis
from cachegen_vllm.codec.format import FrameHeader, frame_coding, frame_heads, frame_widths
from cachegen_vllm.codec.profile import LOSSLESS_BITS
from cachegen_vllm.device import Runtime
from cachegen_vllm.paged.layout import PageOrder, gather, scatter

Frame = bytes | bytearray | memoryview


def _on_gpu(device: torch.device) -> bool:
    """Whether a cache is a CUDA one. The first time one is, this imports the Triton rANS coder and
    lossless field coder, which register themselves with the codec for CUDA tensors."""
    if device.type != "cuda":
        return False
    from cachegen_vllm.kernels import lossless_fields, rans_coder  # noqa: F401  (each registers itself)

    return True


def _kernels_take(geometry: KVGeometry, group_tokens: int, widths: set[int]) -> bool:
    """Whether the Triton frame kernels code frames of these widths on this CUDA cache: bit-packed
    codes or exact, on what `check_supported` accepts (a power-of-two head, 16- or 32-bit floats);
    the reference codec, torch on the same device, takes the rest (lossless, fp8, other heads)."""
    from cachegen_vllm.kernels.paged_codec import check_supported

    try:
        check_supported(geometry, group_tokens)
    except ValueError:
        return False
    return LOSSLESS_BITS not in widths


@dataclass
class PendingEncode:
    """A layer's frames on their way: `finish` makes them, waiting first for the copies
    `start_encode` enqueued (on a CPU cache there are none). The frames own their bytes."""

    finish: Callable[[], list[bytes]]


def start_encode(
    layer_cache: torch.Tensor,
    order: PageOrder | None,
    block_ids: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int,
    count: int,
    total_tokens: int,
    runtime: Runtime | None = None,
    kernels: bool | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> PendingEncode:
    """Begin the frames of tokens ``[token_start, token_start + count)`` of one layer of a request,
    read from its blocks (``block_ids`` on the cache's device; ``order``: the CPU page order, None
    where the tensor's strides are the layout). The kernels and their output's copy to the host go
    on the current stream, with host memory from ``runtime``, and `PendingEncode.finish` waits for
    that copy; the reference codec's work waits for `finish`, which must then run on a stream
    ordered after the cache's writes.
    ``kernels``: whether the Triton kernels encode (default: on a CUDA cache, for bit-packed frames;
    True on a CPU runs them in Triton's interpreter). ``scales``: an fp8 cache's (key, value) scales
    of this layer."""
    runtime = runtime or Runtime(layer_cache.device)
    where = dict(layer=layer, token_start=token_start, total_tokens=total_tokens)
    if kernels is None:
        widths = {w for _, w in profile.widths()}
        kernels = (
            _on_gpu(layer_cache.device)
            and profile.coding == "packed"
            and _kernels_take(geometry, profile.group_tokens, widths)
        )
    if kernels:
        from cachegen_vllm.kernels import frames  # Triton: imported only where the kernels run

        plan = frames.plan_encode(geometry, profile, count=count, device=layer_cache.device, runtime=runtime, **where)
        frames.launch_encode(plan, layer_cache, block_ids)
        payload, bad = runtime.to_host(plan.buffer), [runtime.to_host(b) for b in plan.bad]
        copied = runtime.mark()

        def sealed() -> list[bytes]:
            runtime.wait(copied)
            try:
                return [
                    bytes(frame)
                    if frame is not None
                    else _reference_frame(layer_cache, block_ids, h, geometry, profile, scales)
                    for frame, h in zip(frames.finish_encode(plan, geometry, payload, bad), plan.headers)
                ]
            finally:
                for host in (payload, *bad):
                    runtime.release(host)

        return PendingEncode(sealed)

    def reference() -> list[bytes]:
        key, value = gather(layer_cache, order, block_ids, token_start + count)
        key, value = (t[token_start:].view(geometry.dtype) for t in (key, value))  # fp8: vLLM's uint8 pages
        return encode_layer(key, value, geometry=geometry, profile=profile, scales=scales, **where)

    return PendingEncode(reference)


def encode_blocks(
    layer_cache: torch.Tensor,
    order: PageOrder | None,
    block_ids: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int,
    count: int,
    total_tokens: int,
    runtime: Runtime | None = None,
    kernels: bool | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> list[bytes]:
    """`start_encode` and its `finish` at once, on the current stream (``kernels=True`` on a CPU runs
    the Triton kernels in Triton's interpreter: the same frames, byte for byte)."""
    return start_encode(
        layer_cache,
        order,
        block_ids,
        geometry=geometry,
        profile=profile,
        layer=layer,
        token_start=token_start,
        count=count,
        total_tokens=total_tokens,
        runtime=runtime,
        kernels=kernels,
        scales=scales,
    ).finish()


def _reference_frame(
    cache: torch.Tensor,
    block_ids: torch.Tensor,
    header: FrameHeader,
    geometry: KVGeometry,
    profile: Profile,
    scales: tuple[float, float],
) -> bytes:
    """The reference codec's frame for the tokens and segments of ``header``, on the CPU."""
    key, value = gather(cache, None, block_ids, header.token_start + header.token_count)
    rows = slice(header.token_start, None)
    return encode_chunk(
        key[rows].cpu(),
        value[rows].cpu(),
        geometry=geometry,
        profile=profile,
        layer=header.layer,
        token_start=header.token_start,
        segments=list(header.segments),
        scales=scales,
    )


def _written(token_start: int, count: int, write_start: int, write_end: int) -> tuple[int, int]:
    """The tokens (or heads) of a frame's ``[token_start, token_start + count)`` that ``[write_start,
    write_end)`` lets through: ``[lo, hi)``, empty if ``hi <= lo``."""
    return max(token_start, write_start), min(token_start + count, write_end)


def decode_frames_into_blocks(
    frames: Sequence[Frame],
    layer_caches: Mapping[int, torch.Tensor],
    order: PageOrder | None,
    block_ids: torch.Tensor,
    *,
    geometry: KVGeometry,
    write_start: int,
    write_end: int,
    bases: tuple[Basis, ...] = (),
    runtime: Runtime | None = None,
    kernels: bool | None = None,
    cache_scales: Callable[[int], tuple[float, float]] | None = None,
) -> list[tuple[int, int]]:
    """Decode frames into the request's blocks of their layers, on the current stream: the packed
    frames of the cache's own heads on a GPU in one batch of kernel launches, the others through
    the reference codec (their rANS lanes in one pass). Writes only the tokens in ``[write_start,
    write_end)`` and the heads the cache holds (``geometry``'s share of the model's; a frame may
    hold another); ``bases``: calibrated bases besides the shipped ones that frames may be coded
    in. ``kernels``: whether the Triton kernels decode what they can (default: on a CUDA cache;
    True on a CPU runs them in Triton's interpreter); ``cache_scales``: an fp8 cache's (key, value)
    scales of a layer (default: the producer's, which each frame says). Returns (layer, tokens written) per frame;
    raises FrameError on bad bytes, before writing anything of the frames the kernels decode."""
    device = next(iter(layer_caches.values())).device
    own = (geometry.head_start, geometry.num_kv_heads)
    if kernels is None:
        kernels = _on_gpu(device)
    on_kernels = [
        kernels
        and frame_coding(f) == "packed"
        and frame_heads(f) == own
        and _kernels_take(geometry, 1, frame_widths(f))  # any group size decodes: 1 passes its check
        for f in frames
    ]
    out: dict[int, tuple[int, int]] = {}
    kernel_frames = [f for f, k in zip(frames, on_kernels) if k]
    if kernel_frames:
        from cachegen_vllm.kernels import frames as kernel_codec

        headers = kernel_codec.decode_frames_paged(
            kernel_frames,
            layer_caches,
            block_ids,
            geometry=geometry,
            write_start=write_start,
            write_end=write_end,
            runtime=runtime,
        )
        places = [i for i, k in enumerate(on_kernels) if k]
        for i, header in zip(places, headers):
            lo, hi = _written(header.token_start, header.token_count, write_start, write_end)
            out[i] = (header.layer, max(0, hi - lo))
    rest = [i for i, k in enumerate(on_kernels) if not k]
    chunks = (
        decode_frames([frames[i] for i in rest], geometry, device=device, bases=bases, cache_scales=cache_scales)
        if rest
        else []
    )
    for i, chunk in zip(rest, chunks):
        lo, hi = _written(chunk.token_start, chunk.key.shape[0], write_start, write_end)
        first, last = _written(chunk.head_start, chunk.key.shape[1], geometry.head_start, geometry.heads.stop)
        if lo >= hi or first >= last:
            out[i] = (chunk.layer, 0)
            continue
        rows = slice(lo - chunk.token_start, hi - chunk.token_start)
        heads = slice(first - chunk.head_start, last - chunk.head_start)
        cache = layer_caches[chunk.layer]
        # fp8 values go into vLLM's uint8 pages as they are
        key, value = (t[rows, heads].view(cache.dtype) for t in (chunk.key, chunk.value))
        scatter(cache, order, block_ids, lo, key, value, first_head=first - geometry.head_start)
        out[i] = (chunk.layer, hi - lo)
    return [out[i] for i in range(len(frames))]


def decode_into_blocks(
    frame: Frame,
    layer_caches: Mapping[int, torch.Tensor],
    order: PageOrder | None,
    block_ids: torch.Tensor,
    *,
    geometry: KVGeometry,
    write_start: int,
    write_end: int,
    bases: tuple[Basis, ...] = (),
) -> tuple[int, int]:
    """`decode_frames_into_blocks` for one frame: (layer, tokens written)."""
    return decode_frames_into_blocks(
        [frame],
        layer_caches,
        order,
        block_ids,
        geometry=geometry,
        write_start=write_start,
        write_end=write_end,
        bases=bases,
    )[0]


def warm_up(
    layer_caches: Mapping[int, torch.Tensor],
    order: PageOrder | None,
    *,
    geometry: KVGeometry,
    profile: Profile,
    runtime: Runtime,
    bases: tuple[Basis, ...] = (),
) -> None:
    """Take every path a request will take once, at start-up, so that the first requests compile
    nothing: each Triton kernel variant the profile launches (one per pair of widths), the rANS
    coders (numba's on a CPU). Encodes from the cache's first block and decodes into no token."""
    cache = next(iter(layer_caches.values()))
    layers = {profile.layer_bits(layer): layer for layer in sorted(layer_caches, reverse=True)}.values()
    totals = covering_token_counts(profile)
    table = _first_block_repeated(cache, max(totals), runtime)
    for layer in layers:
        for total in totals:
            frames = encode_blocks(
                layer_caches[layer],
                order,
                table,
                geometry=geometry,
                profile=profile,
                layer=layer,
                token_start=0,
                count=total,
                total_tokens=total,
                runtime=runtime,
            )
            decode_frames_into_blocks(
                frames,
                layer_caches,
                order,
                table,
                geometry=geometry,
                write_start=0,
                write_end=0,
                bases=bases,
                runtime=runtime,
            )


def time_encode(
    layer_cache: torch.Tensor,
    order: PageOrder | None,
    *,
    geometry: KVGeometry,
    profile: Profile,
    runtime: Runtime,
    tokens: int,
) -> tuple[float, int]:
    """(seconds, wire bytes) of encoding ``tokens`` tokens of layer 0 read from the cache's first
    block, repeated: a start-up estimate of the profile's encode rate and size, before any request
    has measured them (run after `warm_up`, so that nothing compiles here)."""
    table = _first_block_repeated(layer_cache, tokens, runtime)
    started = time.perf_counter()
    frames = encode_blocks(
        layer_cache,
        order,
        table,
        geometry=geometry,
        profile=profile,
        layer=0,
        token_start=0,
        count=tokens,
        total_tokens=tokens,
        runtime=runtime,
    )
    return time.perf_counter() - started, sum(map(len, frames))


def _first_block_repeated(layer_cache: torch.Tensor, tokens: int, runtime: Runtime) -> torch.Tensor:
    """A block table for ``tokens`` tokens that reads the cache's first block for all of them."""
    return runtime.to_device(np.zeros(-(-tokens // layer_cache.shape[2]), dtype=np.int64))

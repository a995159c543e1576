"""The codec on vLLM's paged cache: a layer's tokens in a request's blocks to frames
(`encode_blocks`) and frames back into blocks (`decode_into_blocks`). The Triton kernels
(`cachegen_vllm.kernels`) code bit-packed frames on a CUDA cache; the reference codec does the
rest: every frame on a CPU cache, entropy-coded frames on either, and a frame whose values the
kernels' float16 statistics cannot hold (sent exact, as the reference does)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cachegen_vllm.codec import KVGeometry, Profile, decode_chunk, encode_chunk, encode_layer
from cachegen_vllm.codec.basis import Basis
from cachegen_vllm.codec.format import FrameHeader, frame_coding, frame_heads
from cachegen_vllm.paged.layout import PageOrder, gather, scatter

Frame = bytes | bytearray | memoryview


def _on_gpu(device: torch.device) -> bool:
    """Whether a cache is a CUDA one. The first time one is, this imports the Triton rANS coder,
    which registers itself with the codec for CUDA tensors (entropy-coded frames use it)."""
    if device.type != "cuda":
        return False
    from cachegen_vllm.kernels import rans_coder  # noqa: F401  (registers itself)

    return True


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
) -> Sequence[bytes | memoryview]:
    """Frames of tokens ``[token_start, token_start + count)`` of one layer of a request, read from
    its blocks (``order``: the CPU page order, None where the tensor's strides are the layout)."""
    if _on_gpu(layer_cache.device) and profile.coding == "packed":
        return encode_blocks_on_kernels(
            layer_cache,
            block_ids,
            geometry=geometry,
            profile=profile,
            layer=layer,
            token_start=token_start,
            count=count,
            total_tokens=total_tokens,
        )
    key, value = gather(layer_cache, order, block_ids, token_start + count)
    return encode_layer(
        key[token_start:],
        value[token_start:],
        geometry=geometry,
        profile=profile,
        layer=layer,
        token_start=token_start,
        total_tokens=total_tokens,
    )


def encode_blocks_on_kernels(
    layer_cache: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int,
    count: int,
    total_tokens: int,
) -> Sequence[bytes | memoryview]:
    """`encode_blocks` with the Triton kernels, on whatever device the cache is (Triton's
    interpreter runs them on a CPU): the same frames, byte for byte."""
    from cachegen_vllm.kernels import frames  # Triton: imported only where the kernels run

    plan = frames.plan_encode(
        geometry,
        profile,
        layer=layer,
        token_start=token_start,
        count=count,
        total_tokens=total_tokens,
        device=layer_cache.device,
    )
    frames.launch_encode(plan, layer_cache, block_ids)
    sealed = frames.finish_encode(plan, geometry)
    return [
        frame if frame is not None else _reference_frame(layer_cache, block_ids, header, geometry, profile)
        for frame, header in zip(sealed, plan.headers)
    ]


def _reference_frame(
    cache: torch.Tensor, block_ids: torch.Tensor, header: FrameHeader, geometry: KVGeometry, profile: Profile
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
    )


def _written(token_start: int, count: int, write_start: int, write_end: int) -> tuple[int, int]:
    """The tokens (or heads) of a frame's ``[token_start, token_start + count)`` that ``[write_start,
    write_end)`` lets through: ``[lo, hi)``, empty if ``hi <= lo``."""
    return max(token_start, write_start), min(token_start + count, write_end)


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
    """Decode one frame into the request's blocks of its layer, writing only the tokens in
    ``[write_start, write_end)`` and the heads the cache holds (``geometry``'s share of the
    model's; the frame may hold another); ``bases``: calibrated bases besides the shipped ones that
    frames may be coded in. Returns (layer, tokens written); raises FrameError on bad bytes."""
    device = next(iter(layer_caches.values())).device
    own_heads = frame_heads(frame) == (geometry.head_start, geometry.num_kv_heads)
    if _on_gpu(device) and frame_coding(frame) == "packed" and own_heads:
        from cachegen_vllm.kernels import frames

        header = frames.decode_frames_paged(
            [frame],
            layer_caches,
            block_ids,
            geometry=geometry,
            write_start=write_start,
            write_end=write_end,
        )[0]
        lo, hi = _written(header.token_start, header.token_count, write_start, write_end)
        return header.layer, max(0, hi - lo)
    chunk = decode_chunk(frame, geometry, device=device, bases=bases)
    lo, hi = _written(chunk.token_start, chunk.key.shape[0], write_start, write_end)
    first, last = _written(chunk.head_start, chunk.key.shape[1], geometry.head_start, geometry.heads.stop)
    if lo >= hi or first >= last:
        return chunk.layer, 0
    rows = slice(lo - chunk.token_start, hi - chunk.token_start)
    heads = slice(first - chunk.head_start, last - chunk.head_start)
    key, value = chunk.key[rows, heads], chunk.value[rows, heads]
    scatter(layer_caches[chunk.layer], order, block_ids, lo, key, value, first_head=first - geometry.head_start)
    return chunk.layer, hi - lo

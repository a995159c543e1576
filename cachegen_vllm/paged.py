"""Reading and writing a request's tokens in vLLM's paged KV cache, whatever the page layout, and
the codec entry points that work on it: `encode_blocks` and `decode_into_blocks`, the Triton
kernels (`cachegen_vllm.kernels`) on a CUDA cache, the reference codec on a CPU one (and for
entropy-coded frames, which the kernels do not code yet, on either).

vLLM 0.32 hands a connector one tensor per layer, logically
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (K then V on the last dimension). On the
GPU backends that view's strides say where everything is (``LBNHC``, ``LBHNC``...), and gather and
scatter index it directly (``order=None``). On the CPU backend (layout ``LBHNC``) each
(block, head) page is one contiguous run of ``2 * block_size * head_size`` elements: the K area,
then the V area, each packed in an order that depends on the instruction set vLLM picked (``vec``,
``amx``, ``neon``...; with bf16 on AMX the rows are not token-major). Rather than re-implement each
ISA's packing, `probe_page_order` asks vLLM's own ``cpu_attn_reshape_and_cache`` where each
(token, channel) lands, once per layer geometry, and gather/scatter then are one indexed copy each.
A layout that is not a permutation of the page is refused with a clear error instead of being
guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cachegen_vllm.codec import KVGeometry, decode_chunk, encode_layer
from cachegen_vllm.codec.basis import Basis
from cachegen_vllm.codec.format import frame_coding
from cachegen_vllm.config import Profile

PROBE_BASE = 64  # digits 1..64 are exact in every float dtype vLLM uses, bf16 included


@dataclass(frozen=True)
class PageOrder:
    """Flat offsets, within a page, of each (token, channel) of its K and V areas."""

    key: torch.Tensor  # int64 [block_size, head_size], offsets into the page's first half
    value: torch.Tensor  # int64 [block_size, head_size], offsets into the whole page


def probe_page_order(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> PageOrder:
    """Where vLLM's CPU cache writer puts each (token, channel) of one page, found by writing
    known values through it: first ones (which offsets an area uses), then the index of every
    element, one base-64 digit per pass (exact in bf16)."""
    from vllm import _custom_ops as ops

    count = block_size * head_size

    def write(area: str, values: torch.Tensor) -> torch.Tensor:
        data = values.to(dtype).view(block_size, 1, head_size)
        zero = torch.zeros_like(data)
        page = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
        key_cache, value_cache = page.chunk(2, dim=2)
        k, v = (data, zero) if area == "key" else (zero, data)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(block_size), isa)
        return page.view(-1)

    orders = {}
    for area in ("key", "value"):
        positions = (write(area, torch.ones(count)) != 0).nonzero().view(-1)
        if positions.numel() != count:
            raise RuntimeError(f"vLLM CPU page layout (isa={isa}): the {area} area has {positions.numel()} slots, not {count}")
        index, scale = torch.zeros(count, dtype=torch.int64), 1
        while scale < count:
            digits = write(area, torch.arange(count) // scale % PROBE_BASE + 1)[positions].to(torch.int64)
            if not ((digits >= 1) & (digits <= PROBE_BASE)).all():
                raise RuntimeError(f"vLLM CPU page layout (isa={isa}) transforms the values it stores; unsupported")
            index += (digits - 1) * scale
            scale *= PROBE_BASE
        offsets = torch.full((count,), -1, dtype=torch.int64)
        offsets[index] = positions
        if (offsets < 0).any():
            raise RuntimeError(f"vLLM CPU page layout (isa={isa}): the {area} area is not a permutation; unsupported")
        orders[area] = offsets.view(block_size, head_size)
    return PageOrder(**orders)


def _pages(layer: torch.Tensor) -> torch.Tensor:
    num_blocks, heads, block_size, width = layer.shape
    return layer.view(num_blocks, heads, block_size * width)


def gather(layer: torch.Tensor, order: PageOrder | None, block_ids: torch.Tensor, num_tokens: int):
    """K and V ``[num_tokens, heads, head_size]`` of the request whose first tokens are in
    ``block_ids`` (in order). ``order`` None: the tensor's logical view is the layout (its strides
    say where things are, as on the GPU backends)."""
    heads, width = layer.shape[1], layer.shape[3]
    if order is None:
        rows = layer[block_ids].permute(0, 2, 1, 3).reshape(-1, heads, width)[:num_tokens]
        return rows[..., : width // 2], rows[..., width // 2 :]
    pages = _pages(layer)[block_ids]  # [blocks, heads, page]
    # pages[:, :, order] is [blocks, heads, block_size, head_size]; tokens are (block, row)
    key, value = (pages[:, :, o].permute(0, 2, 1, 3).reshape(-1, heads, width // 2)[:num_tokens] for o in (order.key, order.value))
    return key, value


def scatter(layer: torch.Tensor, order: PageOrder | None, block_ids: torch.Tensor, first_token: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write K and V of tokens ``[first_token, first_token + len(key))`` of a request into its blocks."""
    _, heads, block_size, width = layer.shape
    positions = torch.arange(first_token, first_token + key.shape[0], device=block_ids.device)
    blocks = block_ids[positions // block_size][:, None]
    rows = (positions % block_size)[:, None]
    head = torch.arange(heads, device=block_ids.device)[None, :]
    if order is None:
        layer[blocks, head, rows, : width // 2] = key
        layer[blocks, head, rows, width // 2 :] = value
        return
    pages = _pages(layer)
    pages[blocks[..., None], head[..., None], order.key[rows]] = key
    pages[blocks[..., None], head[..., None], order.value[rows]] = value


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
) -> list[bytes | memoryview]:
    """Frames of tokens ``[token_start, token_start + count)`` of one layer of a request, read from
    its blocks: the Triton kernels on a CUDA cache, the reference codec on a CPU one."""
    if layer_cache.is_cuda and profile.coding == "packed":
        from cachegen_vllm import kernels

        return kernels.encode_layer_paged(
            layer_cache, block_ids, geometry=geometry, profile=profile, layer=layer,
            token_start=token_start, count=count, total_tokens=total_tokens,
        )
    key, value = gather(layer_cache, order, block_ids, token_start + count)
    return encode_layer(
        key[token_start:], value[token_start:], geometry=geometry, profile=profile, layer=layer,
        token_start=token_start, total_tokens=total_tokens,
    )


def decode_into_blocks(
    frame: bytes | bytearray | memoryview,
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
    ``[write_start, write_end)``; ``bases``: calibrated bases besides the shipped ones that frames
    may be coded in. Returns (layer, tokens written); raises FrameError on bad bytes."""
    if next(iter(layer_caches.values())).is_cuda and frame_coding(frame) == "packed":
        from cachegen_vllm import kernels

        header = kernels.decode_frames_paged(
            [frame], layer_caches, block_ids, geometry=geometry, write_start=write_start, write_end=write_end,
        )[0]
        lo, hi = max(header.token_start, write_start), min(header.token_start + header.token_count, write_end)
        return header.layer, max(0, hi - lo)
    chunk = decode_chunk(frame, geometry, device=next(iter(layer_caches.values())).device, bases=bases)
    lo, hi = max(chunk.token_start, write_start), min(chunk.token_start + chunk.key.shape[0], write_end)
    if lo < hi:
        rows = slice(lo - chunk.token_start, hi - chunk.token_start)
        scatter(layer_caches[chunk.layer], order, block_ids, lo, chunk.key[rows], chunk.value[rows])
    return chunk.layer, max(0, hi - lo)

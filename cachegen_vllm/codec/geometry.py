"""What a model's KV cache looks like: the geometry both sides of a transfer must agree on, and
the two tensors of every layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import xxhash

# The wire format's dtype codes (docs/FORMAT.md, header field `dtype`).
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class KV(enum.IntEnum):
    """The two tensors of a layer, in the order every frame and basis file stores them."""

    KEY = 0
    VALUE = 1


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a model's KV cache; producer and consumer must agree on it exactly."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    model: str = ""  # a name both sides use for the model; part of the fingerprint

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported KV dtype {self.dtype}; supported: {list(DTYPE_CODES)}")

    @property
    def fingerprint(self) -> int:
        """xxh3-64 of the model's name and geometry: frames of another model are refused by it."""
        text = f"{self.model}|{self.num_layers}|{self.num_kv_heads}|{self.head_dim}|{self.dtype}"
        return xxhash.xxh3_64_intdigest(text.encode())

    @property
    def channels(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_bytes(self, tokens: int) -> int:
        """Bytes of K and V of ``tokens`` tokens of one layer, in the cache's dtype."""
        return 2 * tokens * self.channels * self.dtype.itemsize

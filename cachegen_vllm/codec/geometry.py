"""What a model's KV cache looks like: the geometry both sides of a transfer must agree on, and
the two tensors of every layer."""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass

import torch
import xxhash

# The wire format's dtype codes (docs/FORMAT.md, header field `dtype`).
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float8_e4m3fn: 4, torch.float8_e5m2: 5}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# (exponent bits, mantissa bits) of each: what the lossless coding splits an element into
FLOAT_FIELDS = {
    torch.float16: (5, 10),
    torch.bfloat16: (8, 7),
    torch.float32: (8, 23),
    torch.float8_e4m3fn: (4, 3),
    torch.float8_e5m2: (5, 2),
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class KV(enum.IntEnum):
    """The two tensors of a layer, in the order every frame and basis file stores them."""

    KEY = 0
    VALUE = 1


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a KV cache: the model's, or one tensor-parallel rank's share of its heads
    (``num_kv_heads`` heads from ``head_start`` of the model's ``total_kv_heads``). Producer and
    consumer must agree on the model; each may hold any share of it. ``windows``: each layer's
    sliding window in tokens as vLLM's hybrid KV cache manager keeps it (0, or no entry: full
    attention), which decides what a layer sends (`window_start`). ``latent``: an MLA model's
    cache (DeepSeek V2/V3), whose row per token is one latent of ``2 * head_dim`` channels (the
    compressed KV, then its RoPE part) and no K and V: it is coded as one head whose "key" is the
    row's first ``head_dim`` channels and "value" the rest, which only the exact and lossless
    widths keep meaningful. ``states``: an SSM hybrid's (Granite 4, Nemotron-H) state layers,
    numbered apart from the attention layers ``num_layers`` counts, each one's state in bytes as
    its cache holds it (it travels whole, in STATE frames)."""

    num_layers: int
    num_kv_heads: int  # heads this cache holds
    head_dim: int
    dtype: torch.dtype
    model: str = ""  # a name both sides use for the model; part of the fingerprint
    head_start: int = 0  # the first of them, in the model's numbering
    total_kv_heads: int = 0  # the model's KV heads; 0: num_kv_heads (the whole model)
    windows: tuple[int, ...] = ()  # per layer; empty: every layer full attention
    latent: bool = False  # MLA: a row is one latent, its halves coded as one head's K and V
    states: tuple[int, ...] = ()  # the model's SSM layers (apart from ``num_layers``): each one's state bytes

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported KV dtype {self.dtype}; supported: {list(DTYPE_CODES)}")
        if self.total_kv_heads == 0:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads)
        if self.windows and (len(self.windows) != self.num_layers or min(self.windows) < 0):
            raise ValueError(f"{len(self.windows)} sliding windows for {self.num_layers} layers: {self.windows}")
        if not (self.num_kv_heads >= 1 and 0 <= self.head_start <= self.total_kv_heads - self.num_kv_heads):
            raise ValueError(
                f"heads [{self.head_start}, {self.head_start + self.num_kv_heads}) "
                f"are not a share of the model's {self.total_kv_heads}"
            )

    @functools.cached_property
    def fingerprint(self) -> int:
        """xxh3-64 of the model's name and geometry (all its heads, whatever share this is): frames
        of another model are refused by it."""
        text = f"{self.model}|{self.num_layers}|{self.total_kv_heads}|{self.head_dim}|{self.dtype}"
        return xxhash.xxh3_64_intdigest(text.encode())

    def window(self, layer: int) -> int:
        """The layer's sliding window in tokens, 0 for full attention."""
        return self.windows[layer] if self.windows else 0

    def window_start(self, layer: int, held: int) -> int:
        """The first token of a prompt whose first ``held`` tokens a decode holds that the layer's
        attention reads again: 0 for full attention; for a window of W, ``held - W + 1`` (the next
        token's query reads W keys, its own among them), as vLLM's sliding-window manager keeps
        them."""
        window = self.window(layer)
        return max(0, held - window + 1) if window else 0

    @property
    def heads(self) -> slice:
        """The heads this cache holds, as a slice of the model's."""
        return slice(self.head_start, self.head_start + self.num_kv_heads)

    def shard(self, head_start: int, num_kv_heads: int) -> KVGeometry:
        """The same model's cache holding ``num_kv_heads`` heads from ``head_start``."""
        return dataclasses.replace(self, head_start=head_start, num_kv_heads=num_kv_heads)

    @property
    def fp8(self) -> bool:
        """Whether the cache stores 8-bit floats, scaled per layer (`codec.format`'s header scales)."""
        return self.dtype in FP8_DTYPES

    @property
    def channels(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_bytes(self, tokens: int) -> int:
        """Bytes of K and V of ``tokens`` tokens of one layer, in the cache's dtype."""
        return 2 * tokens * self.channels * self.dtype.itemsize


def rank_heads(total_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first head, count) of the KV heads vLLM's tensor parallelism gives ``tp_rank``: consecutive
    ``total / tp`` heads each, or, with more ranks than heads, one head shared by ``tp / total``
    consecutive ranks."""
    if not 0 <= tp_rank < tp_size or (total_kv_heads % tp_size and tp_size % total_kv_heads):
        raise ValueError(f"rank {tp_rank} of {tp_size} cannot hold a share of {total_kv_heads} KV heads")
    if tp_size <= total_kv_heads:
        count = total_kv_heads // tp_size
        return tp_rank * count, count
    return tp_rank // (tp_size // total_kv_heads), 1

"""Compression profiles as the codec reads them: how a layer's KV is cut into frames and how many
bits each token gets. `cachegen_vllm.config` parses and validates profile files into these.

A profile is model-independent unless it names layers or a basis; `Profile.check_geometry` and
`codec.basis.BasisRegistry.for_profile` bind it to a model's geometry and catch the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from cachegen_vllm.codec.geometry import KV

EXACT_BITS = 16
"""A bit width of 16 means "not quantized": the token's KV travels in the cache's own dtype."""
LOSSLESS_BITS = 15
"""A bit width of 15 means "lossless": the token's KV comes back bit for bit, its exponents coded
(`codec.lossless`). Between 8-bit codes and exact, so that a tier's "at least" keeps its meaning."""

QUANT_BITS = range(1, 9)
ROTATIONS = ("none", "hadamard", "basis")
VALUE_AXES = ("channel", "token")
CODINGS = ("packed", "rans")
MAX_CHUNK_TOKENS = 1 << 16
MAX_LANE_SYMBOLS = (1 << 16) - 1  # a lane's word count travels as a u16
AUTO_BASIS = "auto"  # a profile's `basis`: fitted to the serving model at start-up (fitting/auto.py)
MAX_BASIS_BITS = 5  # wider codes in a calibrated basis would clip its largest coefficients (entropy.alphabet_bits)


def statistics_axis(tensor: KV, value_axis: str) -> str:
    """How a tensor's packed statistics are grouped: keys always per channel (their channels have
    stable ranges), values as the profile's ``value_axis`` says."""
    return "channel" if tensor == KV.KEY else value_axis


class ConfigError(ValueError):
    """A profile or connector option is invalid, or a profile cannot serve a model; the message
    starts with the field's path (``bits.layers[1].key``), which ``field`` holds."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class LayerBits:
    """Bit widths for layers ``first..last`` (inclusive), overriding the profile's base widths."""

    first: int
    last: int
    key: int
    value: int


@dataclass(frozen=True)
class TokenBits:
    """A tier of tokens counted from one end of a request that keeps at least these widths."""

    tokens: int
    key: int
    value: int


@dataclass(frozen=True)
class Profile:
    name: str
    chunk_tokens: int  # tokens per frame; chunks are aligned to multiples of this position
    group_tokens: int  # consecutive tokens sharing one min/scale per channel
    rotation: str  # "hadamard": per-head orthonormal rotation; "basis": a calibrated per-head basis (rans only)
    value_axis: str  # "channel": values quantized like keys; "token": min/scale per token and head
    key_bits: int
    value_bits: int
    layers: tuple[LayerBits, ...] = ()
    recent: tuple[TokenBits, ...] = ()  # counted back from the request's last token
    sink: tuple[TokenBits, ...] = ()  # counted from its first token (attention sinks)
    coding: str = "packed"  # "rans": uniform steps, entropy-coded (docs/FORMAT.md)
    lane_symbols: int = 1024  # rans: codes per lane (each lane costs 6 bytes; fewer lanes, less parallelism)
    basis: str | None = None  # rotation "basis": the basis file (codec.basis), an absolute path
    pre_rope: bool = False  # basis "auto": fitted to undo RoPE on keys (codec.rope); a basis file says so itself
    # an MLA latent is coded at lossy widths only where the profile says so: no MLA model was at
    # hand to measure what quantizing its halves as K and V costs
    lossy_latents: bool = False

    @property
    def lossy(self) -> bool:
        """Whether any width loses information (neither exact nor lossless)."""
        return any(width not in (EXACT_BITS, LOSSLESS_BITS) for _, width in self.widths())

    def check_geometry(self, num_layers: int) -> None:
        """Raise ConfigError if this profile names layers a model of ``num_layers`` lacks (its basis,
        if it names one: `codec.basis.BasisRegistry.for_profile`)."""
        for i, rule in enumerate(self.layers):
            if rule.last >= num_layers:
                raise ConfigError(
                    f"bits.layers[{i}].last", f"layer {rule.last} does not exist (the model has {num_layers} layers)"
                )

    def layer_bits(self, layer: int) -> tuple[int, int]:
        """(key, value) widths of a layer before the token tiers apply."""
        for rule in self.layers:
            if rule.first <= layer <= rule.last:
                return rule.key, rule.value
        return self.key_bits, self.value_bits

    def widths(self) -> list[tuple[str, int]]:
        """Every bit width the profile sets, with the field that sets it."""
        out = [("bits.key", self.key_bits), ("bits.value", self.value_bits)]
        for i, rule in enumerate(self.layers):
            out += [(f"bits.layers[{i}].key", rule.key), (f"bits.layers[{i}].value", rule.value)]
        for tier in ("sink", "recent"):
            for i, t in enumerate(getattr(self, tier)):
                out += [(f"bits.{tier}[{i}].key", t.key), (f"bits.{tier}[{i}].value", t.value)]
        return out

"""Compression profiles: typed, validated once, loaded from TOML files a user can copy and edit.

A profile says how a layer's KV is cut into frames and how many bits each token gets. It is
model-independent unless it names layers; binding it to a model's geometry (`check_geometry`)
catches the rest (a layer override past the last layer, a rotation the head size cannot take).

Errors are `ConfigError` and name the offending field as a path, e.g. ``bits.layers[1].key``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXACT_BITS = 16
"""A bit width of 16 means "not quantized": the token's KV travels in the cache's own dtype."""

QUANT_BITS = range(1, 9)
ROTATIONS = ("none", "hadamard", "basis")
VALUE_AXES = ("channel", "token")
CODINGS = ("packed", "rans")
MAX_CHUNK_TOKENS = 1 << 16
MAX_LANE_SYMBOLS = (1 << 16) - 1
MAX_BASIS_BITS = 5  # wider codes in a calibrated basis would clip its largest coefficients (codec/entropy.py)  # a lane's word count travels as a u16


class ConfigError(ValueError):
    """A profile or connector option is invalid; the message starts with the field's path."""

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
    coding: str = "packed"  # "rans": uniform steps, entropy-coded (wire format, docs/FORMAT.md)
    lane_symbols: int = 1024  # rans: codes per lane (each lane costs 6 bytes; fewer lanes, fewer steps of parallelism)
    basis: str | None = None  # rotation "basis": the basis file (codec/basis.py), an absolute path

    def check_geometry(self, num_layers: int, head_dim: int, num_kv_heads: int | None = None) -> None:
        """Raise ConfigError if this profile cannot serve a model of this shape."""
        if self.basis is not None:
            from cachegen_vllm.codec.basis import load

            fitted = load(self.basis).shape
            if (fitted[0], fitted[2]) != (num_layers, head_dim) or num_kv_heads not in (None, fitted[1]):
                raise ConfigError("basis", f"{self.basis} was fitted on (layers, kv heads, head dim) {fitted}, "
                                  f"this model has ({num_layers}, {num_kv_heads}, {head_dim})")
        for i, rule in enumerate(self.layers):
            if rule.last >= num_layers:
                raise ConfigError(
                    f"bits.layers[{i}].last",
                    f"layer {rule.last} does not exist (the model has {num_layers} layers)",
                )
        if self.rotation == "hadamard" and head_dim & (head_dim - 1):
            raise ConfigError("rotation", f"hadamard needs a power-of-two head_dim, got {head_dim}")

    def layer_bits(self, layer: int) -> tuple[int, int]:
        """(key, value) widths of a layer before the recent-token tiers apply."""
        for rule in self.layers:
            if rule.first <= layer <= rule.last:
                return rule.key, rule.value
        return self.key_bits, self.value_bits


def _bits(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not (
        value in QUANT_BITS or value == EXACT_BITS
    ):
        raise ConfigError(field, f"must be an integer 1..8, or {EXACT_BITS} for exact; got {value!r}")
    return value


def _positive(field: str, value: Any, upper: int = 1 << 31) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= upper:
        raise ConfigError(field, f"must be an integer in 1..{upper}; got {value!r}")
    return value


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(field, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _table(field: str, value: Any, allowed: set[str], required: set[str]) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(field, f"must be a table; got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            prefix = f"{field}." if field else ""
            raise ConfigError(f"{prefix}{key}", f"unknown field (known: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in value:
            prefix = f"{field}." if field else ""
            raise ConfigError(f"{prefix}{key}", "is required")
    return value


def _list(field: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ConfigError(field, f"must be an array of tables; got {type(value).__name__}")
    return value


def _basis_file(rotation: str, coding: str, value: Any, root: Path | None) -> str | None:
    """The absolute path of a profile's basis file (relative paths are from the profile's directory),
    loaded once here so that a bad file fails at startup."""
    if rotation != "basis":
        if value is not None:
            raise ConfigError("basis", f'is only read with rotation = "basis" (rotation is {rotation!r})')
        return None
    if coding != "rans":
        raise ConfigError("rotation", f'"basis" needs coding = "rans": bit-packed codes cannot spend bits per component')
    if not isinstance(value, str):
        raise ConfigError("basis", f'rotation = "basis" needs the path of a basis file; got {value!r}')
    path = Path(value) if root is None else root / value
    from cachegen_vllm.codec.basis import load

    try:
        load(str(path.resolve()))
    except ValueError as e:
        raise ConfigError("basis", str(e)) from None
    return str(path.resolve())


def profile_from_dict(data: dict, name: str, root: Path | None = None) -> Profile:
    """Validate a parsed profile (``root``: where its relative paths start). Every error names its field."""
    top = _table(
        "",
        data,
        {"chunk_tokens", "group_tokens", "rotation", "value_axis", "coding", "lane_symbols", "basis", "bits"},
        {"chunk_tokens", "group_tokens", "bits"},
    )
    chunk_tokens = _positive("chunk_tokens", top["chunk_tokens"], MAX_CHUNK_TOKENS)
    group_tokens = _positive("group_tokens", top["group_tokens"], MAX_CHUNK_TOKENS)
    bits = _table("bits", top["bits"], {"key", "value", "layers", "recent", "sink"}, {"key", "value"})

    layers = []
    for i, raw in enumerate(_list("bits.layers", bits.get("layers", []))):
        f = f"bits.layers[{i}]"
        rule = _table(f, raw, {"first", "last", "key", "value"}, {"first", "last", "key", "value"})
        first = rule["first"]
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise ConfigError(f"{f}.first", f"must be a layer index >= 0; got {first!r}")
        last = rule["last"]
        if not isinstance(last, int) or isinstance(last, bool) or last < first:
            raise ConfigError(f"{f}.last", f"must be a layer index >= first ({first}); got {last!r}")
        for j, other in enumerate(layers):
            if first <= other.last and other.first <= last:
                raise ConfigError(f"{f}.first", f"layers {first}..{last} overlap bits.layers[{j}]")
        layers.append(LayerBits(first, last, _bits(f"{f}.key", rule["key"]), _bits(f"{f}.value", rule["value"])))

    def tiers(field: str) -> tuple[TokenBits, ...]:
        out = []
        for i, raw in enumerate(_list(f"bits.{field}", bits.get(field, []))):
            f = f"bits.{field}[{i}]"
            tier = _table(f, raw, {"tokens", "key", "value"}, {"tokens", "key", "value"})
            out.append(TokenBits(_positive(f"{f}.tokens", tier["tokens"]), _bits(f"{f}.key", tier["key"]), _bits(f"{f}.value", tier["value"])))
        return tuple(out)

    rotation = _choice("rotation", top.get("rotation", "none"), ROTATIONS)
    coding = _choice("coding", top.get("coding", "packed"), CODINGS)
    profile = Profile(
        name=name,
        chunk_tokens=chunk_tokens,
        group_tokens=group_tokens,
        rotation=rotation,
        value_axis=_choice("value_axis", top.get("value_axis", "channel"), VALUE_AXES),
        coding=coding,
        basis=_basis_file(rotation, coding, top.get("basis"), root),
        lane_symbols=_positive("lane_symbols", top.get("lane_symbols", 1024), MAX_LANE_SYMBOLS),
        key_bits=_bits("bits.key", bits["key"]),
        value_bits=_bits("bits.value", bits["value"]),
        layers=tuple(layers),
        recent=tiers("recent"),
        sink=tiers("sink"),
    )
    if rotation == "basis":  # a basis's alphabet spans 2**(bits+4) steps, up to the widest table (codec/entropy.py)
        widths = [("bits.key", profile.key_bits), ("bits.value", profile.value_bits)]
        widths += [(f"bits.layers[{i}].{n}", w) for i, r in enumerate(profile.layers) for n, w in (("key", r.key), ("value", r.value))]
        widths += [(f"bits.{field}[{i}].{n}", w) for field in ("sink", "recent") for i, t in enumerate(getattr(profile, field))
                   for n, w in (("key", t.key), ("value", t.value))]
        for field, width in widths:
            if MAX_BASIS_BITS < width < EXACT_BITS:
                raise ConfigError(field, f'rotation = "basis" codes at most {MAX_BASIS_BITS} bits (or {EXACT_BITS}, exact); got {width}')
    return profile


def shipped_profiles() -> list[str]:
    """Names of the profiles in configs/."""
    root = importlib.resources.files("cachegen_vllm.configs")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name (``default``) or any profile file by path."""
    text_path = Path(name_or_path)
    if text_path.suffix == ".toml" or text_path.exists():
        if not text_path.is_file():
            raise ConfigError("profile", f"no profile file at {text_path}")
        text, name, root = text_path.read_text(), text_path.stem, text_path.parent
    else:
        resource = importlib.resources.files("cachegen_vllm.configs") / f"{name_or_path}.toml"
        if not resource.is_file():
            known = ", ".join(shipped_profiles())
            raise ConfigError("profile", f"unknown profile {str(name_or_path)!r} (shipped: {known}; or give a .toml path)")
        text, name = resource.read_text(), str(name_or_path)
        root = Path(str(importlib.resources.files("cachegen_vllm.configs")))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("profile", f"{name}: not valid TOML: {e}") from None
    return profile_from_dict(data, name, root)



@dataclass(frozen=True)
class TransportConfig:
    """Options of the ZeroMQ transport (cachegen_vllm.transport), the same on both sides."""

    bind: str = "tcp://127.0.0.1:0"  # producer: where to listen; loopback unless told otherwise
    max_buffer_bytes: int = 2 << 30  # producer: frames held for consumers, all transfers together
    max_frame_bytes: int = 64 << 20  # larger frames are refused by the producer and the consumer
    credit_frames: int = 16  # consumer: frames a transfer may have in flight or unread
    ttl_s: float = 60.0  # producer: a transfer no consumer has pulled is evicted after this
    lease_s: float = 15.0  # producer: a pulled transfer whose consumer stops renewing it (heartbeats) is evicted after this
    heartbeat_s: float = 1.0  # consumer: how often it pings the producers it waits on
    peer_timeout_s: float = 10.0  # consumer: silence after which a producer counts as gone
    # CurveZMQ (zmq.auth certificate files). Producer: its secret certificate and a directory of
    # the consumers' public certificates it accepts. Consumer: its secret certificate and the
    # producer's public certificate. All unset: no encryption, any peer that reaches the port is
    # served (keep `bind` on loopback or a private network then).
    curve_secret_key_file: str | None = None
    curve_server_public_key_file: str | None = None
    curve_authorized_keys_dir: str | None = None

    @property
    def curve(self) -> bool:
        return self.curve_secret_key_file is not None


def _seconds(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise ConfigError(field, f"must be a positive number of seconds; got {value!r}")
    return float(value)


def transport_config_from_dict(data: dict, prefix: str = "") -> TransportConfig:
    """Validate transport options; errors name the field (with ``prefix``, e.g. ``transport.``)."""
    fields = {f.name for f in dataclasses.fields(TransportConfig)}
    _table(prefix.rstrip("."), data, fields, set())

    def f(name: str) -> str:
        return prefix + name

    out = {}
    for name, value in data.items():
        if name == "bind":
            if not isinstance(value, str) or not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f(name), f"must be a ZeroMQ endpoint like tcp://127.0.0.1:5555; got {value!r}")
            out[name] = value
        elif name in ("max_buffer_bytes", "max_frame_bytes", "credit_frames"):
            out[name] = _positive(f(name), value, 1 << 40)
        elif name in ("ttl_s", "lease_s", "heartbeat_s", "peer_timeout_s"):
            out[name] = _seconds(f(name), value)
        else:
            if value is not None and not Path(value).exists():
                raise ConfigError(f(name), f"no such file or directory: {value}")
            out[name] = None if value is None else str(value)
    config = TransportConfig(**out)
    if config.curve_secret_key_file is None and (config.curve_server_public_key_file or config.curve_authorized_keys_dir):
        raise ConfigError(f("curve_secret_key_file"), "is required when any other curve_* option is set")
    if config.heartbeat_s >= config.peer_timeout_s:
        raise ConfigError(f("peer_timeout_s"), f"must exceed heartbeat_s ({config.heartbeat_s})")
    return config


@dataclass(frozen=True)
class ConnectorConfig:
    """``kv_connector_extra_config`` of the CacheGenConnector, validated once at start-up."""

    profile: Profile
    transport: TransportConfig
    advertise: str  # producer: the endpoint decode instances connect to (default: bind)
    load_timeout_s: float  # consumer: a transfer not complete by then fails (policy decides)


CONNECTOR_FIELDS = {"profile", "advertise", "load_timeout_s"}
EXTRA = "kv_connector_extra_config."


def connector_config_from_dict(extra: dict, producer: bool) -> ConnectorConfig:
    """Validate ``kv_connector_extra_config``; errors name the field, e.g.
    ``kv_connector_extra_config.profile: unknown profile 'fast'``. Transport options (bind,
    credit_frames, ttl_s, curve_* key files...) sit beside the connector's own."""
    if not isinstance(extra, dict):
        raise ConfigError(EXTRA.rstrip("."), "must be a JSON object")
    transport_fields = {f.name for f in dataclasses.fields(TransportConfig)}
    for key in extra:
        if key not in CONNECTOR_FIELDS | transport_fields:
            raise ConfigError(EXTRA + key, f"unknown option (known: {', '.join(sorted(CONNECTOR_FIELDS | transport_fields))})")
    try:
        profile = load_profile(extra.get("profile", "default"))
    except ConfigError as e:
        raise ConfigError(EXTRA + "profile", str(e).split(": ", 1)[1]) from None
    transport = transport_config_from_dict({k: v for k, v in extra.items() if k in transport_fields}, prefix=EXTRA)
    if producer and transport.bind.startswith("tcp://") and transport.bind.endswith(":0"):
        raise ConfigError(EXTRA + "bind", "a producer needs a fixed port, e.g. tcp://127.0.0.1:5601 (decode instances connect to it)")
    advertise = extra.get("advertise", transport.bind)
    if not isinstance(advertise, str) or not advertise.startswith(("tcp://", "ipc://")):
        raise ConfigError(EXTRA + "advertise", f"must be a ZeroMQ endpoint like tcp://10.0.0.5:5601; got {advertise!r}")
    if not producer and transport.curve and not transport.curve_server_public_key_file:
        raise ConfigError(EXTRA + "curve_server_public_key_file", "is required on a consumer when CURVE is on")
    return ConnectorConfig(profile, transport, advertise, _seconds(EXTRA + "load_timeout_s", extra.get("load_timeout_s", 120.0)))

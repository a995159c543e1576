"""Configuration, parsed and validated once at start-up into typed dataclasses: compression
profiles from TOML files a user can copy and edit (into `codec.profile.Profile`), the transport's
options (`transport.config.TransportConfig`) and the connector's ``kv_connector_extra_config``
(`ConnectorConfig`).

Errors are `ConfigError` and name the offending field as a path, e.g. ``bits.layers[1].key`` or
``kv_connector_extra_config.profile``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachegen_vllm.codec import basis
from cachegen_vllm.codec.profile import (
    AUTO_BASIS,
    CODINGS,
    EXACT_BITS,
    LOSSLESS_BITS,
    MAX_BASIS_BITS,
    MAX_CHUNK_TOKENS,
    MAX_LANE_SYMBOLS,
    QUANT_BITS,
    ROTATIONS,
    VALUE_AXES,
    ConfigError,
    LayerBits,
    Profile,
    TokenBits,
)
from cachegen_vllm.params import IPC_ENDPOINT, TCP_ENDPOINT
from cachegen_vllm.transport.config import TransportConfig

__all__ = [
    "ConfigError",
    "ConnectorConfig",
    "connector_config_from_dict",
    "load_profile",
    "profile_from_dict",
    "shipped_profiles",
    "transport_config_from_dict",
]


def _bits(field: str, value: Any) -> int:
    if value == "lossless":
        return LOSSLESS_BITS
    if not isinstance(value, int) or isinstance(value, bool) or not (value in QUANT_BITS or value == EXACT_BITS):
        raise ConfigError(field, f'must be an integer 1..8, "lossless", or {EXACT_BITS} for exact; got {value!r}')
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
        raise ConfigError("rotation", '"basis" needs coding = "rans": bit-packed codes cannot spend bits per component')
    if value == AUTO_BASIS:  # fitted to the serving model when a connector starts (fitting/auto.py)
        return AUTO_BASIS
    if not isinstance(value, str):
        raise ConfigError("basis", f'rotation = "basis" needs the path of a basis file or "auto"; got {value!r}')
    path = Path(value) if root is None else root / value
    try:
        basis.load(str(path.resolve()))
    except ValueError as e:
        raise ConfigError("basis", str(e)) from None
    return str(path.resolve())


def _flag(field: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false; got {value!r}")
    return value


def profile_from_dict(data: dict, name: str, root: Path | None = None) -> Profile:
    """Validate a parsed profile (``root``: where its relative paths start). Every error names its field."""
    top = _table(
        "",
        data,
        {
            "chunk_tokens",
            "group_tokens",
            "rotation",
            "value_axis",
            "coding",
            "lane_symbols",
            "basis",
            "bits",
            "lossy_latents",
            "pre_rope",
        },
        {"chunk_tokens", "group_tokens", "bits"},
    )
    chunk_tokens = _positive("chunk_tokens", top["chunk_tokens"], MAX_CHUNK_TOKENS)
    group_tokens = _positive("group_tokens", top["group_tokens"], MAX_CHUNK_TOKENS)
    bits = _table("bits", top["bits"], {"key", "value", "layers", "recent", "sink"}, {"key", "value"})

    layers: list[LayerBits] = []
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
            out.append(
                TokenBits(
                    _positive(f"{f}.tokens", tier["tokens"]),
                    _bits(f"{f}.key", tier["key"]),
                    _bits(f"{f}.value", tier["value"]),
                )
            )
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
        lossy_latents=_flag("lossy_latents", top.get("lossy_latents", False)),
        pre_rope=_flag("pre_rope", top.get("pre_rope", False)),
    )
    if profile.pre_rope and profile.basis != AUTO_BASIS:
        raise ConfigError("pre_rope", 'is read with basis = "auto" (a basis file holds whether it undoes RoPE)')
    if rotation == "basis":  # a basis's alphabet spans 2**(bits+4) steps, up to the widest table (codec/entropy.py)
        for field, width in profile.widths():
            if MAX_BASIS_BITS < width < LOSSLESS_BITS:
                raise ConfigError(
                    field,
                    f'rotation = "basis" codes at most {MAX_BASIS_BITS} bits (or {EXACT_BITS}, exact); got {width}',
                )
    return profile


def cache_dir() -> Path:
    """Where the project keeps what it makes once and reuses: the embedded model, fitted bases."""
    return Path(os.environ.get("CACHEGEN_VLLM_CACHE", Path.home() / ".cache" / "cachegen-vllm"))


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
            raise ConfigError(
                "profile", f"unknown profile {str(name_or_path)!r} (shipped: {known}; or give a .toml path)"
            )
        text, name = resource.read_text(), str(name_or_path)
        root = Path(str(importlib.resources.files("cachegen_vllm.configs")))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("profile", f"{name}: not valid TOML: {e}") from None
    return profile_from_dict(data, name, root)


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

    out: dict[str, Any] = {}
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
    if config.curve_secret_key_file is None and (
        config.curve_server_public_key_file or config.curve_authorized_keys_dir
    ):
        raise ConfigError(f("curve_secret_key_file"), "is required when any other curve_* option is set")
    if config.heartbeat_s >= config.peer_timeout_s:
        raise ConfigError(f("peer_timeout_s"), f"must exceed heartbeat_s ({config.heartbeat_s})")
    return config


@dataclass(frozen=True)
class AllowedProducers:
    """The producers a decode may be told to load from: endpoints (``tcp://10.0.0.5:5601``: the
    first rank of a prefill instance) and networks (``10.0.0.0/8``: any producer whose host is an
    address in it; a host name matches only an endpoint listed whole)."""

    endpoints: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def allows(self, endpoint: str) -> bool:
        if endpoint in self.endpoints:
            return True
        match = TCP_ENDPOINT.fullmatch(endpoint)
        if match is None:
            return False
        try:
            host = ipaddress.ip_address(match.group(1).strip("[]"))
        except ValueError:  # a name: only an endpoint listed whole
            return False
        return any(host in network for network in self.networks)


def _allowed_producers(field: str, value: Any) -> AllowedProducers | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigError(
            field, f"must be a list of endpoints (tcp://HOST:PORT) and networks (10.0.0.0/8); got {value!r}"
        )
    endpoints, networks = [], []
    for i, entry in enumerate(value):
        if isinstance(entry, str) and (TCP_ENDPOINT.fullmatch(entry) or IPC_ENDPOINT.fullmatch(entry)):
            endpoints.append(entry)
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except (TypeError, ValueError):
            raise ConfigError(
                f"{field}[{i}]",
                f"must be an endpoint like tcp://10.0.0.5:5601 or a network like 10.0.0.0/8; got {entry!r}",
            ) from None
    return AllowedProducers(frozenset(endpoints), tuple(networks))


KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
_ENV = re.compile(r"\$\{(\w+)\}")


@dataclass(frozen=True)
class ConnectorConfig:
    """The CacheGenConnector's ``kv_role`` and ``kv_connector_extra_config``, validated once at
    start-up."""

    kv_role: str  # kv_producer (prefill), kv_consumer (decode), or kv_both (each request's params say)
    ladder: tuple[Profile, ...]  # producer: the profile, or with "adaptive" the levels, least compressed first
    transport: TransportConfig
    advertise: str  # producer: the endpoint decode instances connect to (default: bind)
    load_timeout_s: float  # consumer: a transfer not complete by then fails (policy decides)
    link_mbps: float | None = None  # producer, adaptive: the link's goodput, fixed, instead of measuring it
    recompute_tokens_per_s: float | None = None  # consumer: its own prefill rate; a slower link recomputes
    allowed_producers: AllowedProducers | None = None  # consumer: None, any producer a request names
    # producer: encoded layers (and the reference codec's inputs) waiting for the sealer, at most;
    # pinned host memory of this size is allocated at start-up on a GPU
    max_encode_inflight_bytes: int = 512 << 20

    @property
    def adaptive(self) -> bool:
        """The producer chooses a level of the ladder per request and layer (`adaptation`)."""
        return len(self.ladder) > 1

    @property
    def sends(self) -> bool:
        """Saves the KV of requests that ask for a remote decode."""
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def receives(self) -> bool:
        """Loads the KV of requests whose prefill ran elsewhere."""
        return self.kv_role in ("kv_consumer", "kv_both")


CONNECTOR_FIELDS = {
    "profile",
    "ladder",
    "link_mbps",
    "recompute_tokens_per_s",
    "advertise",
    "load_timeout_s",
    "allowed_producers",
    "max_encode_inflight_bytes",
}
ADAPTIVE = "adaptive"  # the profile name that picks a level of `ladder` per request and layer
DEFAULT_LADDER = ("raw", "high-quality", "default")  # for any model; the embedded one adds its basis
EXTRA = "kv_connector_extra_config."


def _endpoint(field: str, value: Any) -> str:
    """A ZeroMQ endpoint decode instances can connect to; ``${VAR}`` is read from the environment
    (a pod's IP, say), and an unset variable is an error naming it."""
    if not isinstance(value, str):
        raise ConfigError(field, f"must be a ZeroMQ endpoint like tcp://10.0.0.5:5601; got {value!r}")
    missing = [name for name in _ENV.findall(value) if name not in os.environ]
    if missing:
        raise ConfigError(field, f"names the environment variable {missing[0]}, which is not set")
    endpoint = _ENV.sub(lambda m: os.environ[m.group(1)], value)
    if not endpoint.startswith(("tcp://", "ipc://")):
        raise ConfigError(field, f"must be a ZeroMQ endpoint like tcp://10.0.0.5:5601; got {endpoint!r}")
    return endpoint


def _rate(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise ConfigError(field, f"must be a positive number; got {value!r}")
    return float(value)


def _profile(field: str, name: Any) -> Profile:
    if not isinstance(name, str):
        raise ConfigError(field, f"must be a profile's name or a .toml path; got {name!r}")
    try:
        return load_profile(name)
    except ConfigError as e:
        raise ConfigError(field, str(e).split(": ", 1)[1]) from None


def _ladder(extra: dict) -> tuple[Profile, ...]:
    """The profile, or with ``"adaptive"`` the ladder's levels (least compressed first, the last
    one the quality floor), which must cut frames at the same token positions."""
    name = extra.get("profile", "default")
    if name != ADAPTIVE:
        if "ladder" in extra:
            raise ConfigError(EXTRA + "ladder", f'is read only with profile "{ADAPTIVE}"')
        return (_profile(EXTRA + "profile", name),)
    names = extra.get("ladder", list(DEFAULT_LADDER))
    if not isinstance(names, list) or len(names) < 2:
        raise ConfigError(EXTRA + "ladder", f"must list two profiles or more, least compressed first; got {names!r}")
    ladder = tuple(_profile(f"{EXTRA}ladder[{i}]", n) for i, n in enumerate(names))
    for i, profile in enumerate(ladder[1:], 1):
        if profile.chunk_tokens != ladder[0].chunk_tokens:
            raise ConfigError(
                f"{EXTRA}ladder[{i}]",
                f"chunk_tokens {profile.chunk_tokens} differs from ladder[0]'s {ladder[0].chunk_tokens}",
            )
    return ladder


def connector_config_from_dict(kv_role: str | None, extra: Any) -> ConnectorConfig:
    """Validate a connector's ``kv_role`` and ``kv_connector_extra_config``; errors name the field,
    e.g. ``kv_connector_extra_config.profile: unknown profile 'fast'``. Transport options (bind,
    credit_frames, ttl_s, curve_* key files...) sit beside the connector's own."""
    if kv_role not in KV_ROLES:
        raise ConfigError("kv_role", f"CacheGenConnector takes {', '.join(KV_ROLES)}; got {kv_role!r}")
    if not isinstance(extra, dict):
        raise ConfigError(EXTRA.rstrip("."), "must be a JSON object")
    transport_fields = {f.name for f in dataclasses.fields(TransportConfig)}
    for key in extra:
        if key not in CONNECTOR_FIELDS | transport_fields:
            known = ", ".join(sorted(CONNECTOR_FIELDS | transport_fields))
            raise ConfigError(EXTRA + key, f"unknown option (known: {known})")
    transport = transport_config_from_dict({k: v for k, v in extra.items() if k in transport_fields}, prefix=EXTRA)
    config = ConnectorConfig(
        kv_role,
        _ladder(extra),
        transport,
        _endpoint(EXTRA + "advertise", extra.get("advertise", transport.bind)),
        _seconds(EXTRA + "load_timeout_s", extra.get("load_timeout_s", 120.0)),
        _rate(EXTRA + "link_mbps", extra.get("link_mbps")),
        _rate(EXTRA + "recompute_tokens_per_s", extra.get("recompute_tokens_per_s")),
        _allowed_producers(EXTRA + "allowed_producers", extra.get("allowed_producers")),
        _positive(
            EXTRA + "max_encode_inflight_bytes",
            extra.get("max_encode_inflight_bytes", ConnectorConfig.max_encode_inflight_bytes),
            1 << 40,
        ),
    )
    if config.link_mbps is not None and not config.adaptive:
        raise ConfigError(EXTRA + "link_mbps", f'is read only with profile "{ADAPTIVE}"')
    if "max_encode_inflight_bytes" in extra and not config.sends:
        raise ConfigError(EXTRA + "max_encode_inflight_bytes", f"is read by a prefill; {kv_role} encodes nothing")
    for field in ("recompute_tokens_per_s", "allowed_producers"):
        if getattr(config, field) is not None and not config.receives:
            raise ConfigError(EXTRA + field, f"is read by a decode; {kv_role} loads nothing")
    if config.sends and transport.bind.startswith("tcp://") and transport.bind.endswith(":0"):
        raise ConfigError(
            EXTRA + "bind", f"{kv_role} needs a fixed port, e.g. tcp://127.0.0.1:5601 (decode instances connect to it)"
        )
    if config.receives and transport.curve and not transport.curve_server_public_key_file:
        raise ConfigError(EXTRA + "curve_server_public_key_file", f"is required on a {kv_role} when CURVE is on")
    return config

"""The wire format: one self-describing, checksummed frame per (request, layer, chunk).

docs/FORMAT.md is the normative description; this module is its only implementation, and the
decoder validates every length and field *before* it allocates or reads anything. Bad bytes raise
`FrameError`, whose message says what is wrong; nothing else escapes `read_frame`, which reads a
frame once where it enters and hands its header on with its bytes (`ParsedFrame`).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import xxhash

from cachegen_vllm.codec import lossless
from cachegen_vllm.codec.allocation import Segment
from cachegen_vllm.codec.bitpack import packed_nbytes
from cachegen_vllm.codec.geometry import DTYPE_CODES, DTYPES, KV, KVGeometry
from cachegen_vllm.codec.profile import EXACT_BITS, LOSSLESS_BITS, MAX_CHUNK_TOKENS, QUANT_BITS, statistics_axis
from cachegen_vllm.codec.quant import STAT_DTYPE, stats_count

MAGIC = b"CGKV"
VERSION = 7
ALIGN = 16  # every array in the payload starts at a multiple of 16 bytes of the frame

FLAG_VALUE_PER_TOKEN = 1 << 0
FLAG_HADAMARD = 1 << 1
FLAG_RANS = 1 << 2
FLAG_LATENT = 1 << 3
FLAG_STATE = 1 << 4  # the frame carries an SSM layer's state, not K and V (alone: no other flag)
KNOWN_FLAGS = FLAG_VALUE_PER_TOKEN | FLAG_HADAMARD | FLAG_RANS | FLAG_LATENT | FLAG_STATE

HEADER = struct.Struct("<4sHHQQHHHBBHHIIIHHHHff")
SEGMENT = struct.Struct("<IBBHII")
CHECKSUM = struct.Struct("<Q")

Frame = bytes | bytearray | memoryview  # a frame's bytes, however they are held


class FrameError(ValueError):
    """A frame is malformed, corrupted, from another model, or not the one expected."""


class HeaderFields(NamedTuple):
    """The fixed header, field by field, as `HEADER` packs it (docs/FORMAT.md, "Layout")."""

    magic: bytes
    version: int
    flags: int
    fingerprint: int
    basis: int
    num_layers: int
    num_kv_heads: int  # the model's
    head_dim: int
    dtype: int
    num_segments: int
    layer: int
    group_tokens: int
    token_start: int
    token_count: int
    frame_bytes: int
    lane_symbols: int
    head_start: int  # the frame's heads, in the model's numbering
    head_count: int
    window: int  # the layer's sliding window as the producer's vLLM keeps it; 0: full attention
    key_scale: float  # fp8 caches: the producer's scales (a value is its stored number times these); 1 otherwise
    value_scale: float

    @classmethod
    def unpack(cls, view: memoryview) -> HeaderFields:
        return cls(*HEADER.unpack_from(view, 0))


@dataclass(frozen=True)
class FrameHeader:
    layer: int
    token_start: int
    group_tokens: int
    value_axis: str  # "channel" | "token" (packed tensors only)
    hadamard: bool
    segments: tuple[Segment, ...]
    coding: str = "packed"  # quantized tensors: "packed" (bit-packed min/max codes) or "rans"
    lane_symbols: int = 0  # rans: most codes per lane
    stream_words: tuple[tuple[int, int], ...] = ()  # rans: (key, value) stream words per segment
    basis: int = 0  # rans: digest of the calibrated basis the tensors are coded in (codec.basis), 0 if none
    # the KV heads the frame holds, as parsed; sealing writes those of the geometry it is given
    head_start: int = 0
    head_count: int = 0
    scales: tuple[float, float] = (1.0, 1.0)  # (key, value): what a stored fp8 number is multiplied by
    window: int = 0  # the layer's sliding window, as parsed; sealing writes the geometry's
    latent: bool = False  # an MLA latent's halves as K and V, as parsed; sealing writes the geometry's
    state_bytes: int = 0  # a STATE frame's: the bytes of the SSM state it carries (``layer``: its SSM layer)

    def words(self, index: int, tensor: KV) -> int:
        """The stream length of ``tensor`` in segment ``index``: 16-bit rANS words, or a lossless
        tensor's escaped exponents (0 if it has neither)."""
        return self.stream_words[index][tensor] if self.stream_words else 0

    def axis(self, tensor: KV) -> str:
        return statistics_axis(tensor, self.value_axis)

    @property
    def token_count(self) -> int:
        return sum(s.tokens for s in self.segments)

    @property
    def widths(self) -> set[int]:
        """The bit widths of its segments, keys and values."""
        return {bits for s in self.segments for bits in (s.key_bits, s.value_bits)}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def rans_lanes(elements: int, lane_symbols: int) -> int:
    """Lanes of an entropy-coded tensor: its codes dealt out at most ``lane_symbols`` per lane."""
    return -(-elements // lane_symbols)


def array_sizes(
    tokens: int, bits: int, axis: str, geometry: KVGeometry, group_tokens: int, rans: tuple[int, int] | None = None
) -> list[int]:
    """Byte sizes of the arrays one tensor (K or V) of one segment puts on the wire, in order;
    ``rans`` = (lane_symbols, stream words) for an entropy-coded tensor, (0, escapes) for a lossless one."""
    elements = tokens * geometry.channels
    if bits == EXACT_BITS:
        return [elements * geometry.dtype.itemsize]
    if bits == LOSSLESS_BITS:
        return lossless.array_sizes(elements, geometry.channels, geometry.dtype, rans[1] if rans else 0)
    if rans is not None:
        lanes = rans_lanes(elements, rans[0])
        # centers fp16, table ids u8, step fp32, final states u32, words per lane u16, stream u16
        return [2 * geometry.channels, geometry.channels, 4, 4 * lanes, 2 * lanes, 2 * rans[1]]
    stats = stats_count(tokens, geometry.num_kv_heads, geometry.head_dim, axis, group_tokens)
    stat_bytes = stats * STAT_DTYPE.itemsize
    return [stat_bytes, stat_bytes, packed_nbytes(elements, bits)]


def payload_offset(num_segments: int) -> int:
    return _aligned(HEADER.size + SEGMENT.size * num_segments)


def tensor_arrays(header: FrameHeader, geometry: KVGeometry) -> list[list[list[int]]]:
    """For each segment, the byte sizes of the K arrays and of the V arrays, in frame order."""
    out = []
    for i, seg in enumerate(header.segments):
        tensors = []
        for t in KV:
            bits = seg.bits(t)
            streamed = header.coding == "rans" or bits == LOSSLESS_BITS
            rans = (header.lane_symbols, header.words(i, t)) if streamed else None
            tensors.append(array_sizes(seg.tokens, bits, header.axis(t), geometry, header.group_tokens, rans))
        out.append(tensors)
    return out


def payload_arrays(header: FrameHeader, geometry: KVGeometry) -> list[list[tuple[int, int]]]:
    """For each segment, [(offset, nbytes) of each K array] + [... of each V array] in the frame."""
    offset = payload_offset(len(header.segments))
    layout = []
    for tensors in tensor_arrays(header, geometry):
        arrays = []
        for n in tensors[0] + tensors[1]:
            arrays.append((offset, n))
            offset += _aligned(n)
        layout.append(arrays)
    return layout


def frame_nbytes(header: FrameHeader, geometry: KVGeometry) -> int:
    payload = sum(_aligned(n) for tensors in tensor_arrays(header, geometry) for sizes in tensors for n in sizes)
    return payload_offset(len(header.segments)) + payload + CHECKSUM.size


def seal_frame(header: FrameHeader, geometry: KVGeometry, frame: bytearray | memoryview) -> None:
    """Write the header, segment table and checksum into a `frame_nbytes`-long buffer whose payload
    arrays (and zero padding) are already in place: what a kernel that wrote the payload needs."""
    total = frame_nbytes(header, geometry)
    if len(frame) != total:
        raise ValueError(f"frame buffer must be {total} bytes, got {len(frame)}")
    flags = (
        (FLAG_VALUE_PER_TOKEN if header.value_axis == "token" else 0)
        | (FLAG_HADAMARD if header.hadamard else 0)
        | (FLAG_RANS if header.coding == "rans" else 0)
        | (FLAG_LATENT if geometry.latent else 0)
    )
    _pack_header(
        frame,
        geometry,
        flags=flags,
        basis=header.basis,
        num_segments=len(header.segments),
        layer=header.layer,
        group_tokens=header.group_tokens,
        token_start=header.token_start,
        token_count=header.token_count,
        lane_symbols=header.lane_symbols,
        head_start=geometry.head_start,
        head_count=geometry.num_kv_heads,
        window=geometry.window(header.layer),
        key_scale=header.scales[0],
        value_scale=header.scales[1],
    )
    for i, seg in enumerate(header.segments):
        SEGMENT.pack_into(
            frame,
            HEADER.size + i * SEGMENT.size,
            seg.tokens,
            seg.key_bits,
            seg.value_bits,
            0,
            header.words(i, KV.KEY),
            header.words(i, KV.VALUE),
        )
    _pack_checksum(frame)


def _pack_header(frame: bytearray | memoryview, geometry: KVGeometry, **fields: Any) -> None:
    """The fixed header into ``frame``: the model's fields from ``geometry``, the frame's own
    (`HeaderFields` by name) as given."""
    model = {
        "fingerprint": geometry.fingerprint,
        "num_layers": geometry.num_layers,
        "num_kv_heads": geometry.total_kv_heads,
        "head_dim": geometry.head_dim,
        "dtype": DTYPE_CODES[geometry.dtype],
    }
    HEADER.pack_into(frame, 0, *HeaderFields(magic=MAGIC, version=VERSION, frame_bytes=len(frame), **model, **fields))


def _pack_checksum(frame: bytearray | memoryview) -> None:
    """The checksum over everything before it, into the frame's last bytes."""
    end = len(frame) - CHECKSUM.size
    CHECKSUM.pack_into(frame, end, _checksum(memoryview(frame)[:end]))


def write_frame(header: FrameHeader, geometry: KVGeometry, arrays: Sequence[Frame]) -> bytes:
    """Assemble a frame from its payload arrays, in `payload_arrays` order."""
    out = bytearray(frame_nbytes(header, geometry))
    slots = [slot for seg in payload_arrays(header, geometry) for slot in seg]
    if len(slots) != len(arrays):
        raise ValueError(f"frame layout has {len(slots)} arrays, got {len(arrays)}")
    for (offset, n), data in zip(slots, arrays):
        if len(data) != n:
            raise ValueError(f"array at offset {offset} must be {n} bytes, got {len(data)}")
        out[offset : offset + n] = data
    seal_frame(header, geometry, out)
    return bytes(out)


def write_state_frame(geometry: KVGeometry, index: int, tokens: int, state: Frame) -> bytes:
    """A STATE frame: the model's SSM layer ``index`` (in model order, apart from the attention
    layers) as the first ``tokens`` tokens of the prompt leave it, its bytes as the cache holds
    them (docs/FORMAT.md, "State frames")."""
    nbytes = len(state)
    offset = payload_offset(1)
    total = offset + _aligned(nbytes) + CHECKSUM.size
    frame = bytearray(total)
    _pack_header(
        frame,
        geometry,
        flags=FLAG_STATE,
        basis=0,
        num_segments=1,
        layer=index,
        group_tokens=1,
        token_start=tokens - 1,
        token_count=1,
        lane_symbols=0,
        head_start=0,
        head_count=geometry.total_kv_heads,
        window=0,
        key_scale=1.0,
        value_scale=1.0,
    )
    SEGMENT.pack_into(frame, HEADER.size, 1, EXACT_BITS, EXACT_BITS, 0, nbytes, 0)
    frame[offset : offset + nbytes] = state
    _pack_checksum(frame)
    return bytes(frame)


def _check_bits(field: str, bits: int) -> None:
    if not (bits in QUANT_BITS or bits in (LOSSLESS_BITS, EXACT_BITS)):
        raise FrameError(f"{field} is {bits}, not 1..8, {LOSSLESS_BITS} (lossless) or {EXACT_BITS} (exact)")


@dataclass(frozen=True)
class ParsedFrame:
    """A frame read once, where it entered (`read_frame`): its bytes, its header, and the model it
    says it belongs to. Everything but that model's identity is checked; `check` compares it with
    a geometry. Every later decision (layer, basis, coding, heads, widths) reads ``header``."""

    data: memoryview
    header: FrameHeader
    fingerprint: int
    model_shape: tuple[int, int, int, torch.dtype]  # (layers, the model's kv heads, head dim, dtype)

    def check(self, geometry: KVGeometry, expect_layer: int | None = None, expect_token_start: int | None = None):
        """FrameError unless the frame is of ``geometry``'s model (any share of its heads), and of
        the layer and first token expected, if given."""
        want = (geometry.num_layers, geometry.total_kv_heads, geometry.head_dim, geometry.dtype)
        if self.model_shape != want:
            raise FrameError(
                f"KV geometry (layers, kv heads, head dim, dtype) is {self.model_shape}, this model's is {want}"
            )
        if self.fingerprint != geometry.fingerprint:
            raise FrameError(
                f"model fingerprint {self.fingerprint:016x} is not this model's ({geometry.fingerprint:016x})"
            )
        if expect_token_start is not None and self.header.token_start != expect_token_start:
            raise FrameError(f"frame starts at token {self.header.token_start}, expected token {expect_token_start}")
        if self.header.state_bytes:
            self._check_state(geometry)
            return
        if self.header.latent != geometry.latent:
            kinds = ("K and V", "an MLA latent")
            raise FrameError(
                f"the frame carries {kinds[self.header.latent]}, this cache holds {kinds[geometry.latent]}"
            )
        window = geometry.window(self.header.layer)
        if self.header.window != window:
            raise FrameError(
                f"layer {self.header.layer} was sent for {_attention(self.header.window)}, this cache keeps "
                f"{_attention(window)}: both instances must run vLLM's hybrid KV cache manager alike"
            )
        if expect_layer is not None and self.header.layer != expect_layer:
            raise FrameError(f"frame is for layer {self.header.layer}, expected layer {expect_layer}")

    def _check_state(self, geometry: KVGeometry) -> None:
        index, nbytes = self.header.layer, self.header.state_bytes
        if index >= len(geometry.states):
            raise FrameError(f"a state frame of SSM layer {index}; this model has {len(geometry.states)} SSM layers")
        if nbytes != geometry.states[index]:
            raise FrameError(
                f"SSM layer {index}'s state is {nbytes} bytes in the frame, {geometry.states[index]} in this cache"
            )

    @property
    def state(self) -> memoryview:
        """A STATE frame's state bytes."""
        offset = payload_offset(1)
        return self.data[offset : offset + self.header.state_bytes]

    def shard(self, geometry: KVGeometry) -> KVGeometry:
        """The share of ``geometry``'s model whose heads the frame holds: what sizes its arrays."""
        return geometry.shard(self.header.head_start, self.header.head_count)


def _attention(window: int) -> str:
    return f"a sliding window of {window} tokens" if window else "full attention"


def _checksum(view: memoryview) -> int:
    return xxhash.xxh3_64_intdigest(view)


def _integrity(view: memoryview) -> HeaderFields:
    """The header's fields of a frame whose magic, version, length and checksum are right."""
    size = len(view)
    if size < HEADER.size + SEGMENT.size + CHECKSUM.size:
        raise FrameError(f"frame is {size} bytes, shorter than the smallest possible frame")
    fields = HeaderFields.unpack(view)
    if fields.magic != MAGIC:
        raise FrameError(f"bad magic {bytes(fields.magic)!r}, expected {MAGIC!r}")
    if fields.version != VERSION:
        raise FrameError(f"wire format version {fields.version}, this decoder reads version {VERSION}")
    if fields.frame_bytes != size:
        raise FrameError(f"frame says it is {fields.frame_bytes} bytes but {size} arrived")
    if _checksum(view[: size - CHECKSUM.size]) != CHECKSUM.unpack_from(view, size - CHECKSUM.size)[0]:
        raise FrameError("checksum mismatch: the frame was corrupted")
    return fields


def frame_tokens(frame: Frame) -> tuple[int, int]:
    """``(token_start, token_count)`` from a frame's header, without checking the rest: for the
    producer, which routes its own frames by the tokens they hold."""
    view = memoryview(frame).cast("B")
    if len(view) < HEADER.size or bytes(view[:4]) != MAGIC:
        raise FrameError("not a frame: too short or bad magic")
    fields = HeaderFields.unpack(view)
    return fields.token_start, fields.token_count


def read_frame(frame: Frame) -> ParsedFrame:
    """Validate a frame whole, once: magic, version, length and checksum first (before any field
    is trusted), then every field and the segment table against the sizes they imply, for the
    model the header names; raise FrameError on anything wrong. `ParsedFrame.check` compares that
    model with the reader's."""
    view = memoryview(frame).cast("B")
    size = len(view)
    h = _integrity(view)
    if h.flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown flags 0x{h.flags & ~KNOWN_FLAGS:x}")
    if h.dtype not in DTYPES:
        raise FrameError(f"the frame's KV geometry has dtype code {h.dtype}, none of {sorted(DTYPES)}")
    if h.num_layers == 0 or h.head_dim == 0:
        raise FrameError(f"a model of {h.num_layers} layers and heads {h.head_dim} wide")
    if h.flags & FLAG_STATE:
        return _read_state(view, h)
    if h.head_count == 0 or h.head_start + h.head_count > h.num_kv_heads:
        raise FrameError(
            f"heads [{h.head_start}, {h.head_start + h.head_count}) are not among the model's {h.num_kv_heads}"
        )
    geometry = KVGeometry(  # the frame's heads: what sizes its arrays
        h.num_layers, h.head_count, h.head_dim, DTYPES[h.dtype], head_start=h.head_start, total_kv_heads=h.num_kv_heads
    )
    if h.layer >= h.num_layers:
        raise FrameError(f"layer {h.layer} out of range (model has {h.num_layers})")
    if h.group_tokens == 0:
        raise FrameError("group_tokens is 0")
    coding = "rans" if h.flags & FLAG_RANS else "packed"
    hadamard = bool(h.flags & FLAG_HADAMARD)
    if (h.lane_symbols == 0) != (coding == "packed"):
        raise FrameError(f"lane_symbols {h.lane_symbols} does not fit coding {coding!r}")
    if h.basis and (coding != "rans" or hadamard):
        raise FrameError(f"basis {h.basis:016x} on a {coding} frame{' with a hadamard rotation' if hadamard else ''}")
    if h.num_segments == 0:
        raise FrameError("frame has no segments")
    if payload_offset(h.num_segments) + CHECKSUM.size > size:
        raise FrameError(f"{h.num_segments} segments do not fit in a {size}-byte frame")
    segments, words = [], []
    for i in range(h.num_segments):
        tokens, key_bits, value_bits, reserved, key_words, value_words = SEGMENT.unpack_from(
            view, HEADER.size + i * SEGMENT.size
        )
        if tokens == 0 or reserved != 0:
            raise FrameError(f"segment {i} is malformed (tokens={tokens}, reserved={reserved})")
        _check_bits(f"segment {i} key bits", key_bits)
        _check_bits(f"segment {i} value bits", value_bits)
        for name, bits, n in (("key", key_bits, key_words), ("value", value_bits, value_words)):
            # a rans lane emits at most one word per code, a lossless element at most one escape;
            # nothing else has a stream
            streamed = bits == LOSSLESS_BITS or (coding == "rans" and bits != EXACT_BITS)
            most = tokens * geometry.channels if streamed else 0
            if n > most:
                raise FrameError(f"segment {i} {name} stream has {n} words, at most {most} possible")
        segments.append(Segment(tokens, key_bits, value_bits))
        words.append((key_words, value_words))
    header = FrameHeader(
        layer=h.layer,
        token_start=h.token_start,
        group_tokens=h.group_tokens,
        value_axis="token" if h.flags & FLAG_VALUE_PER_TOKEN else "channel",
        hadamard=hadamard,
        segments=tuple(segments),
        coding=coding,
        lane_symbols=h.lane_symbols,
        stream_words=tuple(words) if coding == "rans" or any(map(any, words)) else (),
        basis=h.basis,
        head_start=h.head_start,
        head_count=h.head_count,
        scales=(h.key_scale, h.value_scale),
        window=h.window,
        latent=bool(h.flags & FLAG_LATENT),
    )
    if header.token_count != h.token_count:
        raise FrameError(f"segments hold {header.token_count} tokens, header says {h.token_count}")
    if h.token_count > MAX_CHUNK_TOKENS:  # rans codes can be far denser than a bit each: bound the decode
        raise FrameError(f"frame holds {h.token_count} tokens, more than a chunk can ({MAX_CHUNK_TOKENS})")
    for name, scale in (("key_scale", h.key_scale), ("value_scale", h.value_scale)):
        if not (math.isfinite(scale) and scale > 0) or (scale != 1.0 and not geometry.fp8):
            raise FrameError(f"{name} is {scale}: a positive number on an fp8 cache, 1 otherwise")
    expected = frame_nbytes(header, geometry)
    if expected != size:
        raise FrameError(f"segments need a {expected}-byte frame, got {size}")
    model_shape = (h.num_layers, h.num_kv_heads, h.head_dim, DTYPES[h.dtype])
    return ParsedFrame(view, header, h.fingerprint, model_shape)


def _read_state(view: memoryview, h: HeaderFields) -> ParsedFrame:
    """The rest of `read_frame` for a STATE frame: every field that has one value in such a frame
    has it, and its one segment's byte count is the payload's."""
    fixed = {
        "flags": (h.flags, FLAG_STATE),
        "basis": (h.basis, 0),
        "num_segments": (h.num_segments, 1),
        "group_tokens": (h.group_tokens, 1),
        "token_count": (h.token_count, 1),
        "lane_symbols": (h.lane_symbols, 0),
        "head_start": (h.head_start, 0),
        "head_count": (h.head_count, h.num_kv_heads),
        "window": (h.window, 0),
        "key_scale": (h.key_scale, 1.0),
        "value_scale": (h.value_scale, 1.0),
    }
    for name, (got, want) in fixed.items():
        if got != want:
            raise FrameError(f"a state frame's {name} is {got}, not {want}")
    tokens, key_bits, value_bits, reserved, nbytes, value_words = SEGMENT.unpack_from(view, HEADER.size)
    if (tokens, key_bits, value_bits, reserved, value_words) != (1, EXACT_BITS, EXACT_BITS, 0, 0) or nbytes == 0:
        raise FrameError(
            f"a state frame's segment is (tokens {tokens}, bits {key_bits}/{value_bits}, reserved {reserved}, "
            f"words {nbytes}/{value_words}), not (1, {EXACT_BITS}/{EXACT_BITS}, 0, n/0) with n >= 1"
        )
    expected = payload_offset(1) + _aligned(nbytes) + CHECKSUM.size
    if expected != len(view):
        raise FrameError(f"a state of {nbytes} bytes needs a {expected}-byte frame, got {len(view)}")
    header = FrameHeader(
        layer=h.layer,
        token_start=h.token_start,
        group_tokens=1,
        value_axis="channel",
        hadamard=False,
        segments=(Segment(1, EXACT_BITS, EXACT_BITS),),
        head_start=0,
        head_count=h.num_kv_heads,
        state_bytes=nbytes,
    )
    return ParsedFrame(view, header, h.fingerprint, (h.num_layers, h.num_kv_heads, h.head_dim, DTYPES[h.dtype]))


def parse_frame(
    frame: Frame, geometry: KVGeometry, expect_layer: int | None = None, expect_token_start: int | None = None
) -> FrameHeader:
    """`read_frame` and `ParsedFrame.check` at once: the header of a valid frame of ``geometry``'s
    model (any share of its heads); FrameError on anything wrong."""
    parsed = read_frame(frame)
    parsed.check(geometry, expect_layer, expect_token_start)
    return parsed.header

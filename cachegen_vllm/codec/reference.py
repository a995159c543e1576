"""The reference codec in plain torch: runs on CPU and CUDA tensors, and is the oracle that every
kernel is tested against. It produces and reads exactly the bytes of docs/FORMAT.md.

rANS-coded tensors (profile ``coding = "rans"``) are quantized one by one, then all the lanes of
every frame of a call go through one pass of the coder (`entropy.encode`), whose cost is a Python
step per code of a lane, not per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cachegen_vllm.codec import basis as bases_
from cachegen_vllm.codec import entropy, lossless
from cachegen_vllm.codec.allocation import Segment, chunk_bounds, plan_segments
from cachegen_vllm.codec.bitpack import pack, unpack
from cachegen_vllm.codec.format import (
    Frame,
    FrameError,
    FrameHeader,
    ParsedFrame,
    payload_arrays,
    read_frame,
    write_frame,
)
from cachegen_vllm.codec.geometry import FP8_DTYPES, KV, KVGeometry
from cachegen_vllm.codec.lossless import LosslessError
from cachegen_vllm.codec.profile import EXACT_BITS, LOSSLESS_BITS, Profile, statistics_axis
from cachegen_vllm.codec.quant import STAT_DTYPE, dequantize, hadamard_, quantize
from cachegen_vllm.codec.rans import RansError


@dataclass(frozen=True)
class DecodedChunk:
    layer: int
    token_start: int
    key: torch.Tensor  # [tokens, the frame's kv heads, head_dim], the geometry's dtype
    value: torch.Tensor
    head_start: int = 0  # the first of its heads, in the model's numbering


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, uint8 [n], on its device."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@dataclass
class _CodedTensor:
    """One tensor of one segment, coded on its device, waiting for the host to read what it needs."""

    exact: torch.Tensor  # its values: sent as they are if the statistics are not finite
    arrays: list[torch.Tensor]  # its coded arrays (rans: the first three; the lanes come from the coder)
    finite: torch.Tensor | None  # 0-d bool: whether the statistics are finite; None: exact or lossless
    rans: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (symbols, tables, alphabet) to code
    lossless: lossless.Split | None = None  # a lossless tensor: its escape stream, cut once its count is read


@dataclass(frozen=True)
class _Rotation:
    """What a frame's tensors are rotated by before quantizing: nothing, Hadamard, or a basis."""

    hadamard: bool = False
    basis: bases_.Basis | None = None
    heads: slice = field(
        default_factory=lambda: slice(None)
    )  # the model's heads the tensors hold (a basis has a matrix per head)

    def apply(self, x: torch.Tensor, layer: int, tensor: KV, token_start: int) -> torch.Tensor:
        """fp32 [T, H, D] (a new tensor) for finite ``x`` of positions ``token_start..``."""
        if self.basis is not None:
            return self.basis.apply(x.float(), layer, tensor, self.heads, token_start)
        work = x.float().contiguous()  # a copy: the rotation works in place
        return hadamard_(work) if self.hadamard else work

    def invert(self, y: torch.Tensor, layer: int, tensor: KV, token_start: int) -> torch.Tensor:
        if self.basis is not None:
            return self.basis.invert(y, layer, tensor, self.heads, token_start)
        return hadamard_(y) if self.hadamard else y


def _profile_rotation(profile: Profile, geometry: KVGeometry, basis: bases_.Basis | None) -> _Rotation:
    if (profile.rotation == "basis") != (basis is not None):
        raise ValueError(
            f"profile {profile.name!r} codes in a basis: give it (BasisRegistry.for_profile)"
            if basis is None
            else f"profile {profile.name!r} codes in no basis, one was given"
        )
    return _Rotation(profile.rotation == "hadamard", basis, geometry.heads)


def _encode_tensor(
    x: torch.Tensor,
    bits: int,
    axis: str,
    group_tokens: int,
    coding: str,
    rotation: _Rotation,
    where: tuple[int, KV, int],
    scale: float,
) -> _CodedTensor:
    """Code one tensor of one segment with no host read. ``where``: (layer, tensor, the segment's
    first position); ``scale``:
    what the cache's stored numbers are multiplied by (fp8 caches; lossy codes code values)."""
    if bits == EXACT_BITS:
        return _CodedTensor(x, [], None)
    if bits == LOSSLESS_BITS:
        parts = lossless.split(x)
        return _CodedTensor(x, parts.arrays, None, lossless=parts)
    work = rotation.apply(x.float() * scale if scale != 1.0 else x, *where)
    if coding == "rans":
        alphabet = entropy.alphabet_bits(bits, rotation.basis is not None)
        symbols, centers, step = entropy.quantize(work.view(x.shape[0], -1), bits, alphabet)
        finite = torch.isfinite(work).all() & torch.isfinite(centers).all()
        tables = entropy.choose_tables(symbols, alphabet)
        return _CodedTensor(x, [centers, tables, step], finite, (symbols, tables, alphabet))
    codes, mins, scales = quantize(work, bits, axis, group_tokens)
    finite = torch.isfinite(mins).all() & torch.isfinite(scales).all()
    return _CodedTensor(x, [mins, scales, pack(codes, bits)], finite)


def _encode_frames(
    chunks, geometry: KVGeometry, profile: Profile, scales: tuple[float, float], basis: bases_.Basis | None
) -> list[bytes]:
    """Frames for ``chunks``: (key, value, layer, token_start, segments) each. All tensors are coded
    on their device first; then the host reads twice, whatever the token count: which statistics
    are finite and how long each rANS or escape stream is, then every array of every frame in one
    copy."""
    rotation = _profile_rotation(profile, geometry, basis)
    plans = []  # per frame: (layer, token_start, segments, its coded tensors K, V, K, V...)
    for key, value, layer, token_start, segments in chunks:
        expected = (sum(s.tokens for s in segments), geometry.num_kv_heads, geometry.head_dim)
        for name, t in (("key", key), ("value", value)):
            if tuple(t.shape) != expected or t.dtype != geometry.dtype:
                raise ValueError(f"{name} must be {list(expected)} {geometry.dtype}, got {list(t.shape)} {t.dtype}")
        tensors, row = [], 0
        for seg in segments:
            for tensor, x in zip(KV, (key, value)):
                part = x[row : row + seg.tokens]
                bits, axis = seg.bits(tensor), statistics_axis(tensor, profile.value_axis)
                tensors.append(
                    _encode_tensor(
                        part,
                        bits,
                        axis,
                        profile.group_tokens,
                        profile.coding,
                        rotation,
                        (layer, tensor, token_start + row),
                        scales[tensor],
                    )
                )
            row += seg.tokens
        plans.append((layer, token_start, segments, tensors))
    coded = [t for *_, tensors in plans for t in tensors]
    checked = [t for t in coded if t.finite is not None]
    pending = [t for t in coded if t.rans is not None]
    split = [t for t in coded if t.lossless is not None]
    batch = entropy.encode([t.rans for t in pending], profile.lane_symbols) if pending else None  # type: ignore[misc]
    # host read 1: finite statistics, stream lengths, escape counts
    small = [torch.stack([t.finite for t in checked]).to(torch.int64)] if checked else []  # type: ignore[misc]
    small += [torch.stack([t.lossless.escape_count for t in split])] if split else []  # type: ignore[union-attr]
    small += [batch.word_totals()] if batch is not None else []
    read = torch.cat(small).tolist() if small else []
    finite = {id(t): bool(ok) for t, ok in zip(checked, read)}
    escapes = dict(zip(map(id, split), read[len(checked) : len(checked) + len(split)]))
    read = read[len(checked) + len(split) :]
    lanes = dict(zip(map(id, pending), batch.arrays(read))) if batch is not None else {}
    # host read 2: every frame's arrays
    headers, frame_arrays = [], []
    for layer, token_start, segments, tensors in plans:
        arrays, widths, words = [], [], []
        for t, (seg, tensor) in zip(tensors, [(s, k) for s in segments for k in KV]):
            if t.lossless is not None:
                count = escapes[id(t)]
                arrays += [*t.arrays, t.lossless.escape_stream(count)]
                widths.append(LOSSLESS_BITS)
                words.append(count)
                continue
            if not finite.get(id(t), False):  # exact by its width, or sent exact rather than wrong
                arrays.append(_byte_view(t.exact))
                widths.append(EXACT_BITS)
                words.append(0)
                continue
            arrays += [_byte_view(a) for a in t.arrays]
            widths.append(seg.bits(tensor))
            if t.rans is not None:
                states, lane_words, stream = lanes[id(t)]
                arrays += [states, lane_words, stream]
                words.append(stream.numel() // 2)
            else:
                words.append(0)
        final = tuple(Segment(seg.tokens, *widths[2 * i : 2 * i + 2]) for i, seg in enumerate(segments))
        rans_coded = profile.coding == "rans"
        streamed = rans_coded or any(words)
        headers.append(
            FrameHeader(
                layer,
                token_start,
                profile.group_tokens,
                profile.value_axis,
                rotation.hadamard,
                final,
                coding=profile.coding,
                lane_symbols=profile.lane_symbols if rans_coded else 0,
                stream_words=tuple(zip(words[::2], words[1::2])) if streamed else (),
                basis=rotation.basis.digest if rotation.basis is not None else 0,
                scales=scales,
            )
        )
        frame_arrays.append(arrays)
    parts = [a for arrays in frame_arrays for a in arrays]
    host = torch.cat(parts).cpu().numpy().data if parts else memoryview(b"")
    frames, at = [], 0
    for header, arrays in zip(headers, frame_arrays):
        pieces = []
        for a in arrays:
            pieces.append(host[at : at + a.numel()])
            at += a.numel()
        frames.append(write_frame(header, geometry, pieces))
    return frames


def encode_chunk(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int,
    segments: list[Segment],
    scales: tuple[float, float] = (1.0, 1.0),
    basis: bases_.Basis | None = None,
) -> bytes:
    """One frame for tokens ``[token_start, token_start + len(key))`` of one layer.

    key, value: [tokens, kv_heads, head_dim] in ``geometry.dtype``. A segment whose values fp16
    statistics cannot hold (inf/nan or beyond +-65504) is sent exact rather than wrong. ``scales``:
    (key, value) multipliers of an fp8 cache's stored numbers (vLLM's ``k_scale``, ``v_scale``).
    ``basis``: the profile's, if it codes in one (`codec.basis.BasisRegistry.for_profile`).
    """
    chunk = (key, value, layer, token_start, segments)
    return _encode_frames([chunk], geometry, profile, _scales(geometry, scales), basis)[0]


def encode_layer(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    geometry: KVGeometry,
    profile: Profile,
    layer: int,
    token_start: int = 0,
    total_tokens: int | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
    basis: bases_.Basis | None = None,
) -> list[bytes]:
    """Frames for a layer's tokens ``[token_start, token_start + len(key))``, one per chunk (the
    rest as `encode_chunk`).

    ``total_tokens`` (default: the end of this range) is the request's prompt length, from which
    token distances for the recent-token bit tiers are counted.
    """
    total = token_start + key.shape[0] if total_tokens is None else total_tokens
    chunks = []
    for start, count in chunk_bounds(profile, token_start, key.shape[0]):
        rows = slice(start - token_start, start - token_start + count)
        chunks.append((key[rows], value[rows], layer, start, plan_segments(profile, layer, start, count, total)))
    return _encode_frames(chunks, geometry, profile, _scales(geometry, scales), basis)


def _scales(geometry: KVGeometry, scales: tuple[float, float]) -> tuple[float, float]:
    """``scales`` as floats, checked: only an fp8 cache stores scaled numbers."""
    key, value = float(scales[0]), float(scales[1])
    if not all(math.isfinite(s) and s > 0 for s in (key, value)) or ((key, value) != (1.0, 1.0) and not geometry.fp8):
        raise ValueError(f"scales {scales}: positive numbers for an fp8 cache, (1, 1) for a {geometry.dtype} one")
    return key, value


def _frame_rotation(header: FrameHeader, geometry: KVGeometry, bases: bases_.BasisRegistry) -> _Rotation:
    if not header.basis:
        return _Rotation(header.hadamard)
    basis = bases.get(header.basis)
    if basis is None:
        raise FrameError(
            f"the frame is coded in basis {header.basis:016x}, which this decoder does not have: give it the "
            "producer's profile (its basis file), or ship the basis in configs/"
        )
    if basis.shape != (geometry.num_layers, geometry.total_kv_heads, geometry.head_dim):
        raise FrameError(
            f"basis {header.basis:016x} is for (layers, kv heads, head dim) {basis.shape}, not this model's"
        )
    return _Rotation(basis=basis, heads=geometry.heads)


@dataclass(frozen=True)
class _RansPart:
    """An entropy-coded tensor read from a frame, waiting for the coder."""

    coded: entropy.Coded
    centers: torch.Tensor
    step: torch.Tensor
    shape: tuple[int, int, int]
    token_start: int  # its segment's first position


def _rans_part(
    arrays: list[torch.Tensor], header: FrameHeader, bits: int, shape: tuple[int, int, int], token_start: int
) -> _RansPart:
    """The six arrays of a rans tensor, checked where the checksum cannot vouch for the producer."""
    centers, tables, step, states, lane_words, stream = arrays
    step = step.view(torch.float32)
    if bool((tables >= entropy.TABLES).any()):
        raise FrameError(f"a table id is {int(tables.max())}, the bank has {entropy.TABLES}")
    if not (bool(torch.isfinite(step).all()) and float(step) > 0):
        raise FrameError(f"quantization step {float(step)} is not a positive number")
    lane_words = lane_words.view(torch.uint16)
    if int(lane_words.to(torch.int64).sum()) * 2 != stream.numel():
        raise FrameError("the lanes' word counts do not add up to the stream")
    lanes = entropy.Lanes(states.view(torch.uint32), lane_words, stream.view(torch.uint16))
    coded = entropy.Coded(lanes, tables, bits, (shape[0], shape[1] * shape[2]), header.lane_symbols)
    return _RansPart(coded, centers.view(torch.float16), step, shape, token_start)


def decode_frames(
    frames: Sequence[Frame | ParsedFrame],
    geometry: KVGeometry,
    *,
    device: torch.device | str = "cpu",
    expect_layer: int | None = None,
    expect_token_start: int | None = None,
    bases: bases_.BasisRegistry | None = None,
    cache_scales: Callable[[int], tuple[float, float]] | None = None,
) -> list[DecodedChunk]:
    """Decode frames to K and V on ``device``, the rANS lanes of all of them in one pass. Frames
    come as bytes (read here) or read already (`read_frame`, where they entered). ``bases``: where
    the calibrated bases frames name are found (default: the shipped ones); ``cache_scales``: an
    fp8 cache's (key, value) scales of a layer, which the values are stored for (default: the
    producer's, in each frame). Raises FrameError on any bad byte of any frame, a frame of another
    model, or a basis it does not have."""
    bases = bases or bases_.BasisRegistry()
    # per frame: its header, rotation, the scales its values are stored for, and per segment (K, V)
    # a tensor or a _RansPart
    parsed: list[tuple[FrameHeader, _Rotation, tuple[float, float], list[list[torch.Tensor | _RansPart]]]] = []
    pending: list[_RansPart] = []
    for item in frames:
        frame = item if isinstance(item, ParsedFrame) else read_frame(item)
        frame.check(geometry, expect_layer, expect_token_start)
        header = frame.header
        stored_for = cache_scales(header.layer) if cache_scales else header.scales
        shard = frame.shard(geometry)
        rotation = _frame_rotation(header, shard, bases)
        data = torch.frombuffer(bytearray(frame.data), dtype=torch.uint8).to(device)
        segments, start = [], header.token_start
        for seg, slots in zip(header.segments, payload_arrays(header, shard)):
            arrays = [data[offset : offset + n] for offset, n in slots]
            pair: list[torch.Tensor | _RansPart] = []
            for tensor in KV:
                bits, axis = seg.bits(tensor), header.axis(tensor)
                shape = (seg.tokens, shard.num_kv_heads, shard.head_dim)
                own = stored_for[tensor]
                if bits in (EXACT_BITS, LOSSLESS_BITS):
                    if bits == EXACT_BITS:
                        stored = arrays.pop(0).view(shard.dtype).view(shape)
                    else:
                        try:
                            stored = lossless.merge(arrays[:5], shape, shard.dtype)
                        except LosslessError as e:
                            raise FrameError(f"layer {header.layer} lossless {tensor.name.lower()}: {e}") from None
                        del arrays[:5]
                    # numbers stored for the producer's fp8 scale, restored for this cache's
                    same = own == header.scales[tensor]
                    pair.append(stored if same else _store(stored.float() * header.scales[tensor], own, shard.dtype))
                elif header.coding == "rans":
                    alphabet = entropy.alphabet_bits(bits, bool(header.basis))
                    part = _rans_part(arrays[:6], header, alphabet, shape, start)
                    pair.append(part)
                    pending.append(part)
                    del arrays[:6]
                else:
                    mins, scales, packed = (arrays.pop(0) for _ in range(3))
                    codes = unpack(packed, bits, seg.tokens * shard.channels)
                    x = dequantize(
                        codes, mins.view(STAT_DTYPE), scales.view(STAT_DTYPE), shape, axis, header.group_tokens
                    )
                    pair.append(_store(rotation.invert(x, header.layer, tensor, start), own, geometry.dtype))
            segments.append(pair)
            start += seg.tokens
        parsed.append((header, rotation, stored_for, segments))
    try:
        symbols = dict(zip(map(id, pending), entropy.decode([p.coded for p in pending]))) if pending else {}
    except RansError as e:
        raise FrameError(str(e)) from None
    out = []
    for header, rotation, stored_for, segments in parsed:
        tensors = [
            _store(
                rotation.invert(
                    entropy.dequantize(symbols[id(x)], x.centers, x.step, x.coded.bits).view(x.shape),
                    header.layer,
                    tensor,
                    x.token_start,
                ),
                stored_for[tensor],
                geometry.dtype,
            )
            if isinstance(x, _RansPart)
            else x
            for pair in segments
            for tensor, x in zip(KV, pair)
        ]
        key, value = torch.cat(tensors[::2]), torch.cat(tensors[1::2])
        out.append(DecodedChunk(header.layer, header.token_start, key, value, header.head_start))
    return out


def _store(values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """fp32 values as a cache of ``dtype`` stores them: an fp8 cache the values divided by its
    scale, saturated to its range (a cast beyond it gives NaN, not the largest number)."""
    if dtype not in FP8_DTYPES:
        return values.to(dtype)
    largest = torch.finfo(dtype).max
    return (values / scale).clamp(-largest, largest).to(dtype)


def decode_chunk(
    frame: Frame | ParsedFrame,
    geometry: KVGeometry,
    *,
    device: torch.device | str = "cpu",
    expect_layer: int | None = None,
    expect_token_start: int | None = None,
    bases: bases_.BasisRegistry | None = None,
) -> DecodedChunk:
    """Decode one frame to K and V on ``device`` (`decode_frames`). Raises FrameError on any bad byte."""
    return decode_frames(
        [frame], geometry, device=device, expect_layer=expect_layer, expect_token_start=expect_token_start, bases=bases
    )[0]

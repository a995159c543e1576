"""rANS coder, entropy-coded quantizer and rans frames."""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest
import torch
import xxhash

from cachegen_vllm.codec import (
    FrameError,
    KVGeometry,
    decode_chunk,
    decode_frames,
    encode_layer,
    entropy,
    parse_frame,
    rans,
    read_frame,
)
from cachegen_vllm.codec.format import HEADER, payload_arrays
from cachegen_vllm.config import ConfigError, load_profile, profile_from_dict

GEOMETRY = KVGeometry(4, 2, 16, torch.bfloat16, model="test")
RANS = dataclasses.replace(load_profile("default"), coding="rans", chunk_tokens=64, lane_symbols=200)


def _kv(tokens: int, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.rand(GEOMETRY.num_kv_heads, GEOMETRY.head_dim, generator=g) * 3 + 0.1
    shift = torch.randn(GEOMETRY.num_kv_heads, GEOMETRY.head_dim, generator=g) * 2

    def one():
        x = torch.randn(tokens, GEOMETRY.num_kv_heads, GEOMETRY.head_dim, generator=g) * channel_scale + shift
        return (x * scale).to(GEOMETRY.dtype)

    return one(), one()


def _random_tables(steps: int, lanes: int, alphabet: int, seed: int):
    """Random strictly increasing cumulative rows and symbols drawn from them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(5):
        freq = torch.randint(1, 3000, (alphabet,), generator=g).double()
        freq = (freq / freq.sum() * (rans.PROB_SCALE - alphabet)).floor().long() + 1
        freq[0] += rans.PROB_SCALE - freq.sum()
        rows.append(torch.nn.functional.pad(torch.cumsum(freq, 0), (1, 0)))
    cum = torch.stack(rows)
    row = torch.randint(0, 5, (steps, lanes), generator=g)
    symbols = torch.randint(0, alphabet, (steps, lanes), generator=g)
    return cum, row, symbols


def _trimmed(coded):
    """A coder's (states, stream, words per lane) with the stream cut to its words (a coder may
    return unused room after them)."""
    states, stream, lane_words = coded
    return states, stream[: int(lane_words.sum())], lane_words


@pytest.mark.parametrize("steps,lanes,alphabet", [(1, 1, 2), (37, 5, 4), (300, 17, 64), (64, 3, 512)])
def test_rans_round_trip_is_exact(steps, lanes, alphabet):
    cum, row, symbols = _random_tables(steps, lanes, alphabet, seed=steps)
    active = torch.ones(steps, lanes, dtype=torch.bool)
    active[steps // 2 :, 0] = False  # lane 0 is shorter: padding steps code nothing
    lo, hi = cum[row, symbols], cum[row, symbols + 1]
    states, room, lane_words = rans.encode(torch.where(active, hi - lo, rans.PROB_SCALE), torch.where(active, lo, 0))
    assert ((states >= rans.STATE_LOWER) & (states < rans.STATE_LOWER << 16)).all()
    assert room.numel() == steps * lanes  # room for every step's word; the streams come first
    stream = room[: int(lane_words.sum())]
    assert ((stream >= 0) & (stream < 1 << 16)).all()
    starts = torch.arange(5) * (alphabet + 1)
    back = rans.decode(states, stream, lane_words, cum.reshape(-1), starts, row, active)
    assert torch.equal(back, torch.where(active, symbols, 0))


@pytest.mark.parametrize("steps,lanes,alphabet", [(1, 1, 2), (37, 5, 4), (300, 17, 64), (64, 3, 512)])
def test_the_compiled_cpu_coder_is_the_torch_coder(steps, lanes, alphabet):
    """rans_numba (what a CPU producer and consumer run) gives the reference's states, words and
    symbols, and refuses what it refuses."""
    from cachegen_vllm.codec import rans_numba

    cum, row, symbols = _random_tables(steps, lanes, alphabet, seed=steps + 1)
    active = torch.ones(steps, lanes, dtype=torch.bool)
    active[steps // 3 :, -1] = False
    lo, hi = cum[row, symbols], cum[row, symbols + 1]
    freq, start = torch.where(active, hi - lo, rans.PROB_SCALE), torch.where(active, lo, 0)
    want = _trimmed(rans.encode(freq, start))
    got = _trimmed(rans_numba.encode(freq, start))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    args = (cum.reshape(-1), torch.arange(5) * (alphabet + 1), row, active)
    assert torch.equal(rans_numba.decode(*want, *args), rans.decode(*want, *args))
    states, stream, lane_words = want
    for bad in (states + 1, states.flip(0) if lanes > 1 else states + 3):
        with pytest.raises(rans.RansError):
            rans_numba.decode(bad, stream, lane_words, *args)
    if stream.numel():
        with pytest.raises(rans.RansError):
            rans_numba.decode(states, stream[:-1], lane_words, *args)


def test_rans_rate_is_near_the_entropy():
    """A skewed source codes in about its entropy: the coder adds little beyond its 32-bit states."""
    probs = torch.tensor([0.7, 0.2, 0.07, 0.03])
    freq = (probs * rans.PROB_SCALE).long()
    freq[0] += rans.PROB_SCALE - freq.sum()
    cum = torch.nn.functional.pad(torch.cumsum(freq, 0), (1, 0))
    symbols = torch.multinomial(probs, 8 * 4000, replacement=True, generator=torch.Generator().manual_seed(1)).view(
        4000, 8
    )
    states, stream, _ = _trimmed(rans.encode(freq[symbols], cum[symbols]))
    entropy_bits = float(-(probs * probs.log2()).sum()) * symbols.numel()
    coded_bits = 16 * stream.numel() + 32 * states.numel()
    assert entropy_bits < coded_bits < 1.01 * entropy_bits + 32 * 8


def test_corrupted_stream_never_decodes():
    cum, row, symbols = _random_tables(200, 4, 16, seed=3)
    active = torch.ones(200, 4, dtype=torch.bool)
    lo, hi = cum[row, symbols], cum[row, symbols + 1]
    states, stream, lane_words = _trimmed(rans.encode(hi - lo, lo))
    args = (cum.reshape(-1), torch.arange(5) * 17, row, active)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        bad = stream.clone()
        i = int(torch.randint(0, stream.numel(), (1,), generator=g))
        bad[i] ^= 1 << int(torch.randint(0, 16, (1,), generator=g))
        with pytest.raises(rans.RansError):
            rans.decode(states, bad, lane_words, *args)
    with pytest.raises(rans.RansError):
        rans.decode(states ^ 1, stream, lane_words, *args)
    moved = lane_words.clone()
    moved[0] += 1
    moved[1] -= 1
    with pytest.raises(rans.RansError):
        rans.decode(states, stream, moved, *args)


def test_bank_tables_are_the_formats():
    for bits in range(1, 9):
        cum, costs = entropy.bank(bits)
        freqs = torch.diff(cum, dim=1)
        assert cum.shape == (entropy.TABLES, (2 << bits) + 1)
        assert (freqs >= 1).all() and (cum[:, -1] == rans.PROB_SCALE).all()
        # costs are what the coder pays, in 1/1024 bit
        assert costs[5, 3] == round(1024 * math.log2(rans.PROB_SCALE / int(freqs[5, 3])))
        digest = xxhash.xxh3_64_intdigest(freqs.numpy().tobytes() + costs.numpy().tobytes())
        assert digest == entropy.BANK_DIGESTS[bits]
    # a narrow table puts almost all mass on the centre symbol, a wide one spreads it
    cum, _ = entropy.bank(4)
    freqs = torch.diff(cum, dim=1)
    assert freqs[0, 16] > 0.99 * rans.PROB_SCALE
    assert freqs[48].max() < 0.2 * rans.PROB_SCALE  # sigma = 2 steps: the peak is 1/(2 sqrt(2 pi))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantizer_error_and_order_independence(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(96, 24, generator=g) * (torch.rand(24, generator=g) * 4) + torch.randn(24, generator=g) * 3
    symbols, centers, step = entropy.quantize(x, bits)
    back = entropy.dequantize(symbols, centers, step, bits)
    inside = (symbols > 0) & (symbols < (2 << bits) - 1)  # not clamped
    assert ((back - x).abs()[inside] <= step / 2 * (1 + 1e-6)).all()
    # fixed-point sums: the statistics' bits do not depend on the order tokens are summed in
    perm = torch.randperm(96, generator=g)
    s2, c2, st2 = entropy.quantize(x[perm], bits)
    assert torch.equal(c2, centers) and torch.equal(st2, step) and torch.equal(s2, symbols[perm])
    # the step is about 4.13 sigma / 2**bits
    sigma = float((x - centers.float()).pow(2).mean().sqrt())
    assert float(step) == pytest.approx(entropy.GAIN * sigma / 2**bits, rel=1e-3)


def test_quantizer_constant_and_tiny_tensors():
    x = torch.full((8, 4), 3.25)
    symbols, centers, step = entropy.quantize(x, 3)
    assert torch.equal(entropy.dequantize(symbols, centers, step, 3), x)
    tiny = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)) * 1e-6  # scale-free statistics
    symbols, centers, step = entropy.quantize(tiny, 4)
    assert (entropy.dequantize(symbols, centers, step, 4) - tiny).pow(2).mean() < 0.01 * tiny.pow(2).mean()


def test_tables_minimise_the_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g) * torch.tensor([0.2, 1.0, 5.0])
    symbols, _, _ = entropy.quantize(x, 4)
    tables = entropy.choose_tables(symbols, 4)
    assert tables[0] < tables[1] < tables[2]  # narrower data, narrower table
    _, costs = entropy.bank(4)
    for c in range(3):
        paid = costs[:, symbols[:, c]].sum(1)
        assert paid[int(tables[c])] == paid.min()


def test_rans_frames_round_trip_and_beat_packed():
    key, value = _kv(200)
    frames = encode_layer(key, value, geometry=GEOMETRY, profile=RANS, layer=1)
    header = parse_frame(frames[1], GEOMETRY)
    assert header.coding == "rans" and header.lane_symbols == 200
    chunks = decode_frames(frames, GEOMETRY)
    assert [c.token_start for c in chunks] == [0, 64, 128, 192]
    assert [c.key.shape[0] for c in chunks] == [64, 64, 64, 8]
    # frame by frame decodes the same as all at once
    assert all(torch.equal(decode_chunk(f, GEOMETRY).value, c.value) for f, c in zip(frames, chunks))
    k = torch.cat([c.key for c in chunks]).float()
    assert torch.equal(k[:4], key[:4].float())  # exact sink tokens
    packed = encode_layer(key, value, geometry=GEOMETRY, profile=dataclasses.replace(RANS, coding="packed"), layer=1)
    k_packed = torch.cat([c.key for c in decode_frames(packed, GEOMETRY)]).float()
    err = (k - key.float())[4:-32].pow(2).mean()
    err_packed = (k_packed - key.float())[4:-32].pow(2).mean()
    assert err < err_packed
    assert sum(map(len, frames)) < sum(map(len, packed))


def test_rans_frame_matches_the_quantizer():
    """What a frame decodes to is exactly dequantize(quantize(x)) of its rotated tensor."""
    key, value = _kv(64, seed=5)
    profile = dataclasses.replace(RANS, sink=(), recent=(), rotation="none", key_bits=3, value_bits=2)
    (frame,) = encode_layer(key, value, geometry=GEOMETRY, profile=profile, layer=0)
    chunk = decode_chunk(frame, GEOMETRY)
    for x, got, bits in ((key, chunk.key, 3), (value, chunk.value, 2)):
        flat = x.float().reshape(64, -1)
        want = entropy.dequantize(*entropy.quantize(flat, bits), bits).to(GEOMETRY.dtype)
        assert torch.equal(got.reshape(64, -1), want)


def test_non_finite_rans_segments_go_exact():
    key, value = _kv(64, seed=2)
    key[10, 1, 3] = float("inf")
    (frame,) = encode_layer(
        key, value, geometry=GEOMETRY, profile=dataclasses.replace(RANS, sink=(), recent=()), layer=0
    )
    header = parse_frame(frame, GEOMETRY)
    assert [(s.key_bits, s.value_bits) for s in header.segments] == [(16, 4)]
    assert torch.equal(decode_chunk(frame, GEOMETRY).key, key)


def _resign(frame: bytearray) -> bytes:
    struct.pack_into("<Q", frame, len(frame) - 8, xxhash.xxh3_64_intdigest(bytes(frame[:-8])))
    return bytes(frame)


def test_corrupted_rans_payloads_are_refused():
    key, value = _kv(64, seed=4)
    (frame,) = encode_layer(
        key, value, geometry=GEOMETRY, profile=dataclasses.replace(RANS, sink=(), recent=()), layer=0
    )
    header = parse_frame(frame, GEOMETRY)
    _, tables, step, states, lane_words, stream = payload_arrays(header, GEOMETRY)[0][:6]
    # any flipped bit fails the checksum
    for offset, _ in (tables, states, stream):
        bad = bytearray(frame)
        bad[offset] ^= 0x10
        with pytest.raises(FrameError, match="checksum"):
            decode_chunk(bytes(bad), GEOMETRY)
    # a producer that signs bad arrays is still refused, naming what is wrong
    cases = [
        (tables[0], "B", entropy.TABLES, "table id"),
        (step[0], "f", -1.0, "step"),
        (step[0], "f", math.inf, "step"),
        (lane_words[0], "H", 7, "word counts"),
        (states[0], "I", 12345, "corrupted"),
    ]
    for offset, fmt, value, message in cases:
        bad = bytearray(frame)
        struct.pack_into("<" + fmt, bad, offset, value)
        with pytest.raises(FrameError, match=message):
            decode_chunk(_resign(bad), GEOMETRY)
    for i in range(0, stream[1], 7):  # every 7th byte of the stream, re-signed
        bad = bytearray(frame)
        bad[stream[0] + i] ^= 0x04
        with pytest.raises(FrameError, match="corrupted"):
            decode_chunk(_resign(bad), GEOMETRY)


def test_profile_coding_fields_are_validated():
    base = {"chunk_tokens": 256, "group_tokens": 64, "bits": {"key": 4, "value": 4}}
    p = profile_from_dict({**base, "coding": "rans", "lane_symbols": 512}, "x")
    assert (p.coding, p.lane_symbols) == ("rans", 512)
    with pytest.raises(ConfigError, match=r"^coding: must be one of packed, rans"):
        profile_from_dict({**base, "coding": "huffman"}, "x")
    with pytest.raises(ConfigError, match=r"^lane_symbols: must be an integer in 1..65535"):
        profile_from_dict({**base, "lane_symbols": 70000}, "x")


def test_paged_caches_carry_rans_frames():
    """The bound caches' encode and decode (what the connector calls) with a rans profile on a CPU
    cache: the frames are encode_layer's, and decoding writes exactly the asked tokens."""
    from cachegen_vllm.paged import PagedCaches, SaveRange, encode, gather, scatter

    key, value = _kv(150, seed=9)
    blocks = torch.tensor([3, 0, 5])  # 64-token blocks, shuffled
    cache = torch.zeros(6, GEOMETRY.num_kv_heads, 64, 2 * GEOMETRY.head_dim, dtype=GEOMETRY.dtype)
    scatter(cache, None, blocks, 0, key, value)
    frames = encode(PagedCaches({2: cache}, None, GEOMETRY), 2, RANS, SaveRange(blocks.tolist(), 64, 150, 150))
    assert [bytes(f) for f in frames] == encode_layer(
        key[64:], value[64:], geometry=GEOMETRY, profile=RANS, layer=2, token_start=64, total_tokens=150
    )
    target = torch.full_like(cache, float("nan"))
    written = PagedCaches({2: target}, None, GEOMETRY).decode([read_frame(f) for f in frames], blocks, 70, 140)
    assert written == [(2, 58), (2, 12)]
    k, v = gather(target, None, blocks, 150)
    chunks = decode_frames(frames, GEOMETRY)
    decoded_k = torch.cat([c.key for c in chunks])
    assert torch.equal(k[70:140], decoded_k[6:76])
    assert torch.isnan(k[:70].float()).all() and torch.isnan(v[140:].float()).all()


def test_a_frame_claiming_more_tokens_than_a_chunk_is_refused():
    """rans codes can be far denser than a bit each, so the token count, not the frame's size,
    bounds what a decoder allocates: more than a chunk can hold is refused before anything."""
    key, value = _kv(64, seed=6)
    (frame,) = encode_layer(
        key, value, geometry=GEOMETRY, profile=dataclasses.replace(RANS, sink=(), recent=()), layer=0
    )
    bad = bytearray(frame)
    struct.pack_into("<I", bad, 40, 70000)  # header token_count
    struct.pack_into("<I", bad, HEADER.size, 70000)  # the one segment's tokens
    with pytest.raises(FrameError, match="more than a chunk"):
        decode_chunk(_resign(bad), GEOMETRY)

"""The wire format: round trips, and rejection of every kind of bad bytes with FrameError."""

import dataclasses
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachegen_vllm.codec import FrameError, KVGeometry, decode_chunk, encode_layer, parse_frame, read_frame
from cachegen_vllm.codec.format import HEADER, SEGMENT, frame_nbytes
from cachegen_vllm.config import profile_from_dict

GEOMETRY = KVGeometry(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, model="tiny")
PROFILE = profile_from_dict(
    {
        "chunk_tokens": 32,
        "group_tokens": 8,
        "rotation": "hadamard",
        "value_axis": "token",
        "bits": {
            "key": 3,
            "value": 2,
            "layers": [{"first": 0, "last": 0, "key": 8, "value": 8}],
            "recent": [{"tokens": 20, "key": 5, "value": 4}, {"tokens": 3, "key": 16, "value": 16}],
        },
    },
    "test",
)


def _kv(tokens, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, 2, 16, generator=g).to(dtype), torch.randn(tokens, 2, 16, generator=g).to(dtype))


def _frames(tokens=45, layer=2, seed=0, geometry=GEOMETRY):
    k, v = _kv(tokens, seed)
    return encode_layer(k, v, geometry=geometry, profile=PROFILE, layer=layer), k, v


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("axis,rotation", [("token", "hadamard"), ("channel", "none")])
def test_roundtrip(layer, axis, rotation):
    profile = profile_from_dict(
        {
            "chunk_tokens": 32,
            "group_tokens": 8,
            "rotation": rotation,
            "value_axis": axis,
            "bits": {"key": 4, "value": 4, "recent": [{"tokens": 3, "key": 16, "value": 16}]},
        },
        "p",
    )
    k, v = _kv(45, layer)
    frames = encode_layer(k, v, geometry=GEOMETRY, profile=profile, layer=layer, token_start=19, total_tokens=64)
    assert [parse_frame(f, GEOMETRY).token_start for f in frames] == [19, 32]
    chunks = [decode_chunk(f, GEOMETRY, expect_layer=layer, expect_token_start=s) for f, s in zip(frames, [19, 32])]
    k2, v2 = torch.cat([c.key for c in chunks]), torch.cat([c.value for c in chunks])
    assert k2.dtype == v2.dtype == torch.bfloat16 and k2.shape == k.shape
    assert torch.equal(k2[-3:], k[-3:]) and torch.equal(v2[-3:], v[-3:])  # the newest tokens are exact
    rel = ((k2.float() - k.float()).norm() / k.float().norm()).item()
    assert 0 < rel < 0.15  # 4-bit: lossy but close


def test_exact_segments_are_bit_exact_and_stats_overflow_falls_back_to_exact():
    k, v = _kv(10)
    k[3, 1, 7] = 1e30  # beyond fp16: quantizing would be wrong, so the segment is sent exact
    frame = encode_layer(k, v, geometry=GEOMETRY, profile=PROFILE, layer=1)[0]
    header = parse_frame(frame, GEOMETRY)
    assert header.segments[0].key_bits == 16 and header.segments[0].value_bits != 16
    assert torch.equal(decode_chunk(frame, GEOMETRY).key, k)


def test_frame_size_is_what_the_layout_predicts():
    frames, _, _ = _frames()
    for f in frames:
        assert len(f) == frame_nbytes(parse_frame(f, GEOMETRY), GEOMETRY)
    # bits on the wire shrink with the bit width
    sizes = []
    for bits in (2, 4, 8):
        p = profile_from_dict({"chunk_tokens": 64, "group_tokens": 64, "bits": {"key": bits, "value": bits}}, "p")
        sizes.append(len(encode_layer(*_kv(64), geometry=GEOMETRY, profile=p, layer=1)[0]))
    assert sizes[0] < sizes[1] < sizes[2] < 2 * 64 * 32 * 2


def test_wrong_model_geometry_or_dtype_is_rejected():
    frame = _frames()[0][0]
    for other in [
        KVGeometry(4, 2, 16, torch.bfloat16, model="other"),
        KVGeometry(5, 2, 16, torch.bfloat16, model="tiny"),
        KVGeometry(4, 2, 16, torch.float16, model="tiny"),
    ]:
        with pytest.raises(FrameError, match=r"fingerprint|geometry"):
            decode_chunk(frame, other)


def test_frames_out_of_order_are_rejected():
    frames, _, _ = _frames()
    with pytest.raises(FrameError, match="starts at token 32, expected token 0"):
        decode_chunk(frames[1], GEOMETRY, expect_layer=2, expect_token_start=0)
    with pytest.raises(FrameError, match="layer 2, expected layer 3"):
        decode_chunk(frames[0], GEOMETRY, expect_layer=3)


def _resign(frame: bytearray) -> bytes:
    """Recompute the checksum, so that a test reaches the validation behind it."""
    import xxhash

    struct.pack_into("<Q", frame, len(frame) - 8, xxhash.xxh3_64_intdigest(bytes(frame[:-8])))
    return bytes(frame)


@pytest.mark.parametrize(
    "offset,fmt,value,message",
    [
        (0, "4s", b"XXXX", "bad magic"),
        (4, "H", 2, "version 2"),
        (6, "H", 0x80, "unknown flags"),
        (30, "B", 9, "geometry"),
        (31, "B", 0, "no segments"),
        (32, "H", 7, "layer 7 out of range"),
        (34, "H", 0, "group_tokens is 0"),
        (40, "I", 33, "segments hold 32 tokens"),
        (HEADER.size + 4, "B", 9, "key bits is 9"),
        (HEADER.size + 5, "B", 0, "value bits is 0"),
        (HEADER.size + 6, "H", 1, "malformed"),
        (48, "H", 5, "lane_symbols 5"),  # lanes on a packed frame
        (50, "H", 1, r"heads \[1, 3\) are not among the model's 2"),
        (52, "H", 0, r"heads \[0, 0\) are not among"),
        (52, "H", 1, "segments need a"),  # one head of the model's two: the arrays are half the size
        (54, "H", 512, "layer 2 was sent for a sliding window of 512 tokens, this cache keeps full attention"),
        (16, "Q", 5, "basis 0000000000000005 on a packed frame"),
        (HEADER.size + 8, "I", 3, "key stream has 3 words, at most 0"),
        (HEADER.size, "I", 31, "segments hold 38 tokens"),
    ],
)
def test_each_bad_field_is_named(offset, fmt, value, message):
    frame = bytearray(_frames()[0][0])
    struct.pack_into("<" + fmt, frame, offset, value)
    with pytest.raises(FrameError, match=message):
        decode_chunk(_resign(frame), GEOMETRY)


def test_a_frame_names_its_layers_window_and_a_cache_keeping_another_refuses_it():
    """A sliding-window layer's frames say so (from its geometry); a decode whose layer is full
    attention (vLLM's hybrid manager off there), or slides over another window, refuses them."""
    sliding = dataclasses.replace(GEOMETRY, windows=(0, 0, 512, 0))
    frame = _frames(geometry=sliding)[0][0]
    assert read_frame(frame).header.window == 512
    decode_chunk(frame, sliding)
    for other in (GEOMETRY, dataclasses.replace(GEOMETRY, windows=(0, 0, 1024, 0))):
        with pytest.raises(FrameError, match=r"^layer 2 was sent for a sliding window of 512 tokens, this cache"):
            decode_chunk(frame, other)


def test_a_frame_says_it_carries_an_mla_latent_and_a_kv_cache_refuses_it():
    latent = dataclasses.replace(GEOMETRY, latent=True)
    frame = _frames(geometry=latent)[0][0]
    assert read_frame(frame).header.latent and not read_frame(_frames()[0][0]).header.latent
    decode_chunk(frame, latent)
    with pytest.raises(FrameError, match=r"^the frame carries an MLA latent, this cache holds K and V$"):
        decode_chunk(frame, GEOMETRY)
    with pytest.raises(FrameError, match=r"^the frame carries K and V, this cache holds an MLA latent$"):
        decode_chunk(_frames()[0][0], latent)


def _must_reject(data: bytes, original: bytes):
    if data == original:
        return
    with pytest.raises(FrameError):
        decode_chunk(data, GEOMETRY)


FRAMES = _frames()[0]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.sampled_from(FRAMES), st.data())
def test_truncated_frames_are_rejected(frame, data):
    cut = data.draw(st.integers(0, len(frame) - 1))
    _must_reject(frame[:cut], frame)


@PROPERTY
@given(st.sampled_from(FRAMES), st.data())
def test_bit_flips_are_rejected(frame, data):
    positions = data.draw(st.lists(st.integers(0, 8 * len(frame) - 1), min_size=1, max_size=8, unique=True))
    damaged = bytearray(frame)
    for p in positions:
        damaged[p // 8] ^= 1 << (p % 8)
    _must_reject(bytes(damaged), frame)


@PROPERTY
@given(st.sampled_from(FRAMES), st.binary(min_size=1, max_size=64), st.booleans())
def test_oversized_frames_are_rejected(frame, extra, at_end):
    _must_reject(frame + extra if at_end else extra + frame, frame)


@PROPERTY
@given(st.sampled_from(FRAMES), st.data())
def test_reordered_bytes_are_rejected(frame, data):
    """Swap two spans of the frame (sections arriving in the wrong order)."""
    size = data.draw(st.integers(1, 64))
    a = data.draw(st.integers(0, len(frame) - 2 * size))
    b = data.draw(st.integers(a + size, len(frame) - size))
    parts = [frame[:a], frame[b : b + size], frame[a + size : b], frame[a : a + size], frame[b + size :]]
    _must_reject(b"".join(parts), frame)


@PROPERTY
@given(st.binary(max_size=300))
def test_random_bytes_are_rejected(junk):
    with pytest.raises(FrameError):
        decode_chunk(junk, GEOMETRY)


@PROPERTY
@given(st.sampled_from(FRAMES), st.integers(0, HEADER.size + 3 * SEGMENT.size - 1), st.integers(0, 255))
def test_re_signed_header_damage_never_decodes_wrong(frame, offset, byte):
    """Even with a valid checksum, a changed header or segment table is rejected or is a frame
    that still decodes to KV of the declared shape (e.g. a different token_start)."""
    damaged = bytearray(frame)
    if damaged[offset] == byte:
        return
    damaged[offset] = byte
    try:
        chunk = decode_chunk(_resign(damaged), GEOMETRY)
    except FrameError:
        return
    header = parse_frame(_resign(damaged), GEOMETRY)
    assert chunk.key.shape == chunk.value.shape == (header.token_count, 2, 16)

"""The lossless level (codec/lossless.py), fp8 caches' scales in frames, and block Hadamard
rotations of heads that are not a power of two wide."""

import os
import struct

import pytest
import torch
import xxhash

from cachegen_vllm.codec import FrameError, KVGeometry, decode_frames, encode_layer, lossless, parse_frame
from cachegen_vllm.codec.format import CHECKSUM, HEADER, payload_arrays
from cachegen_vllm.codec.profile import LOSSLESS_BITS
from cachegen_vllm.codec.quant import hadamard_
from cachegen_vllm.config import load_profile, profile_from_dict

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
LOSSLESS = load_profile("lossless")


def _geometry(dtype, head_dim=64, heads=3):
    return KVGeometry(num_layers=4, num_kv_heads=heads, head_dim=head_dim, dtype=dtype, model="m")


def _kv(tokens, dtype, heads=3, head_dim=64, seed=0):
    """KV-like tensors: channels of very different scales, and every special value the dtype has."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(heads, head_dim, generator=g) * 4
    k, v = (torch.randn(tokens, heads, head_dim, generator=g) * scale for _ in range(2))
    k[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -3e-8])  # zeros and (for 16/8-bit) subnormals/underflow
    if dtype != torch.float8_e4m3fn:  # e4m3fn has no infinities; NaN everywhere else
        k[1, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    return k.to(dtype), v.to(dtype)


def _bits(x):
    return x.contiguous().view(torch.uint8)


def _decoded(frames, geometry, **kwargs):
    chunks = decode_frames(frames, geometry, **kwargs)
    return torch.cat([c.key for c in chunks]), torch.cat([c.value for c in chunks])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lossless_frames_decode_bit_for_bit(dtype):
    geometry = _geometry(dtype)
    k, v = _kv(600, dtype)
    frames = encode_layer(k, v, geometry=geometry, profile=LOSSLESS, layer=2)
    key, value = _decoded(frames, geometry)
    assert key.dtype == dtype and torch.equal(_bits(key), _bits(k)) and torch.equal(_bits(value), _bits(v))
    assert all(s.key_bits == s.value_bits == LOSSLESS_BITS for f in frames for s in parse_frame(f, geometry).segments)
    # and it is smaller than the cache: exponents in 3 bits instead of E (bf16: 16 -> ~11 bits)
    assert sum(map(len, frames)) < geometry.layer_bytes(600) * {1: 0.95, 2: 0.9, 4: 0.9}[k.element_size()]


def test_lossless_tiers_mix_with_lossy_and_exact_segments():
    bits = {
        "key": 4,
        "value": 4,
        "sink": [{"tokens": 2, "key": 16, "value": 16}],
        "recent": [{"tokens": 10, "key": "lossless", "value": "lossless"}],
    }
    profile = profile_from_dict({"chunk_tokens": 64, "group_tokens": 16, "bits": bits}, "mixed")
    geometry = _geometry(torch.bfloat16)
    k, v = (t.float().nan_to_num(0, 0, 0).bfloat16() for t in _kv(100, torch.float32))
    frames = encode_layer(k, v, geometry=geometry, profile=profile, layer=0)
    widths = [(s.tokens, s.key_bits) for f in frames for s in parse_frame(f, geometry).segments]
    assert widths == [(2, 16), (62, 4), (26, 4), (10, LOSSLESS_BITS)]
    key, _ = _decoded(frames, geometry)
    assert torch.equal(_bits(key[-10:]), _bits(k[-10:])) and torch.equal(_bits(key[:2]), _bits(k[:2]))
    assert not torch.equal(key[2:90], k[2:90])


def _re_signed(frame: bytearray) -> bytearray:
    """The frame with its checksum recomputed: damage a checksum cannot catch (a bad producer)."""
    CHECKSUM.pack_into(frame, len(frame) - CHECKSUM.size, xxhash.xxh3_64_intdigest(bytes(frame[: -CHECKSUM.size])))
    return frame


def test_a_lossless_tensor_whose_escapes_do_not_add_up_is_refused_by_name():
    """An escape count that contradicts the codes is named, never decoded into other values."""
    geometry = _geometry(torch.bfloat16)
    k, v = _kv(64, torch.bfloat16)
    frame = bytearray(encode_layer(k, v, geometry=geometry, profile=LOSSLESS, layer=1)[0])
    header = parse_frame(frame, geometry)
    codes_at = payload_arrays(header, geometry)[0][1][0]  # segment 0, the key's second array
    code = frame[codes_at] & lossless.ESCAPE
    frame[codes_at] = (frame[codes_at] & ~lossless.ESCAPE) | (0 if code == lossless.ESCAPE else lossless.ESCAPE)
    with pytest.raises(FrameError, match=r"layer 1 lossless key: \d+ codes escape, the stream holds"):
        decode_frames([bytes(_re_signed(frame))], geometry)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_frames_carry_the_producers_scales_and_decode_into_the_consumers(dtype):
    geometry = _geometry(dtype)
    k, v = (t.float().nan_to_num(0, 0, 0).clamp(-8, 8).to(dtype) for t in _kv(300, dtype))
    produced = (0.5, 0.25)  # true value = stored number x scale
    for name in ("raw", "lossless", "default", "entropy"):
        frames = encode_layer(k, v, geometry=geometry, profile=load_profile(name), layer=3, scales=produced)
        assert parse_frame(frames[0], geometry).scales == produced
        same_key, same_value = _decoded(frames, geometry)  # a decode with the producer's scales
        other_key, other_value = _decoded(frames, geometry, cache_scales=lambda layer: (1.0, 1.0))
        if name in ("raw", "lossless"):  # the fp8 bytes themselves
            assert torch.equal(_bits(same_key), _bits(k)) and torch.equal(_bits(same_value), _bits(v))
        true_key, true_value = k.float() * produced[0], v.float() * produced[1]
        for got, want, scale in ((other_key, true_key, 1.0), (other_value, true_value, 1.0)):
            # requantized for the consumer's scale: what it holds times its scale is the value,
            # within the codec's loss and one fp8 rounding
            err = (got.float() * scale - want).abs().mean() / want.abs().mean()
            assert err < (0.08 if name in ("raw", "lossless") else 0.25), (name, float(err))


def test_scales_are_checked_on_both_sides():
    bf16, fp8 = _geometry(torch.bfloat16), _geometry(torch.float8_e4m3fn)
    k, v = _kv(20, torch.bfloat16)
    with pytest.raises(ValueError, match=r"scales \(0.5, 1.0\)"):
        encode_layer(k, v, geometry=bf16, profile=LOSSLESS, layer=0, scales=(0.5, 1.0))
    k8, v8 = (t.float().nan_to_num(0, 0, 0).to(torch.float8_e4m3fn) for t in (k, v))
    frame = bytearray(encode_layer(k8, v8, geometry=fp8, profile=LOSSLESS, layer=0, scales=(0.5, 1.0))[0])
    at = HEADER.size - 8  # key_scale, then value_scale
    for bad in (float("nan"), -1.0, 0.0):
        damaged = bytearray(frame)
        struct.pack_into("<f", damaged, at, bad)
        with pytest.raises(FrameError, match=r"key_scale is"):
            parse_frame(_re_signed(damaged), fp8)
    damaged = bytearray(encode_layer(k, v, geometry=bf16, profile=LOSSLESS, layer=0)[0])
    struct.pack_into("<f", damaged, at + 4, 2.0)
    with pytest.raises(FrameError, match=r"value_scale is 2.0: a positive number on an fp8 cache, 1 otherwise"):
        parse_frame(_re_signed(damaged), bf16)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_heads_not_a_power_of_two_wide_are_rotated_in_blocks(head_dim):
    block = head_dim & -head_dim
    x = torch.randn(7, 2, head_dim)
    y = hadamard_(x.clone())
    assert torch.allclose(hadamard_(y.clone()), x, atol=1e-5)  # its own inverse
    assert torch.allclose(y.view(7, 2, -1, block).norm(dim=-1), x.view(7, 2, -1, block).norm(dim=-1), atol=1e-4)
    geometry = _geometry(torch.bfloat16, head_dim=head_dim, heads=2)
    k, v = (torch.randn(200, 2, head_dim).bfloat16() for _ in range(2))
    k[:, :, 5] *= 20  # an outlier channel: the rotation spreads it over its block
    default = load_profile("default")
    frames = encode_layer(k, v, geometry=geometry, profile=default, layer=1)
    assert parse_frame(frames[0], geometry).hadamard
    key, value = _decoded(frames, geometry)
    unrotated = encode_layer(
        k, v, geometry=geometry, profile=profile_from_dict({**_as_dict(default), "rotation": "none"}, "n"), layer=1
    )
    plain_key, _ = _decoded(unrotated, geometry)
    err, plain = ((t.float() - k.float()).pow(2).mean() for t in (key, plain_key))
    assert err < plain  # the rotation pays here as on power-of-two heads
    assert (value.float() - v.float()).pow(2).mean() < 0.02


def _as_dict(profile):
    return {
        "chunk_tokens": profile.chunk_tokens,
        "group_tokens": profile.group_tokens,
        "value_axis": profile.value_axis,
        "bits": {"key": profile.key_bits, "value": profile.value_bits},
    }


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter comparison runs without a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_triton_field_coder_writes_the_references_bytes(dtype, monkeypatch):
    from cachegen_vllm.kernels import lossless_fields

    geometry = _geometry(dtype)
    k, v = _kv(300, dtype, seed=3)
    reference = encode_layer(k, v, geometry=geometry, profile=LOSSLESS, layer=0)
    monkeypatch.setitem(lossless._FIELDS, "cpu", lossless.FieldCoder(lossless_fields.split, lossless_fields.merge))
    assert encode_layer(k, v, geometry=geometry, profile=LOSSLESS, layer=0) == reference
    key, value = _decoded(reference, geometry)  # merged by the Triton kernel
    assert torch.equal(_bits(key), _bits(k)) and torch.equal(_bits(value), _bits(v))

import pytest
import torch

from cachegen_vllm.codec.bitpack import pack, packed_nbytes, unpack

SIZES = [1, 2, 7, 8, 9, 13, 63, 64, 65, 1001]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", SIZES)
def test_roundtrip_is_exact(bits, count):
    codes = torch.randint(
        0, 1 << bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(count * 9 + bits)
    )
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack(packed, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_is_little_endian_bit_stream(bits):
    """Pin the wire layout: code i sits at bits [i*b, (i+1)*b) of a little-endian stream."""
    codes = torch.randint(0, 1 << bits, (37,), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    stream = sum(int(c) << (i * bits) for i, c in enumerate(codes))
    expected = stream.to_bytes(packed_nbytes(37, bits), "little")
    assert bytes(pack(codes, bits).tolist()) == expected


def test_all_ones_fill_every_bit():
    for bits in range(1, 8):
        packed = pack(torch.full((8,), (1 << bits) - 1, dtype=torch.uint8), bits)
        assert packed.tolist() == [255] * bits


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 8)

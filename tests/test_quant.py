import math

import pytest
import torch

from cachegen_vllm.codec.quant import dequantize, hadamard_, quantize, stats_count


def _kv(tokens=50, heads=3, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads, dim, generator=g)
    x[:, 0, 5] = x[:, 0, 5] * 30 + 100  # an outlier channel with a large offset, as keys have
    return x


def _steps(scales, shape, axis, group_tokens):
    """The quantization step that applies to each element."""
    tokens, heads, dim = shape
    if axis == "token":
        return scales.float().view(tokens, heads, 1).expand(shape)
    group = torch.arange(tokens) // group_tokens
    return scales.float().view(-1, heads * dim)[group].view(shape)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("axis,group_tokens", [("channel", 16), ("channel", 64), ("token", 16)])
def test_error_within_half_a_step(bits, axis, group_tokens):
    x = _kv()
    codes, mins, scales = quantize(x, bits, axis, group_tokens)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    assert mins.numel() == scales.numel() == stats_count(*x.shape, axis, group_tokens)
    y = dequantize(codes, mins, scales, x.shape, axis, group_tokens)
    step = _steps(scales, x.shape, axis, group_tokens)
    # half a step, plus fp32 rounding of the dequantization itself
    assert ((y - x).abs() <= step / 2 + 1e-5 * x.abs().clamp_min(1)).all()


def test_statistics_round_outward():
    """fp16 min is never above the true min and the grid reaches the true max."""
    x = _kv()
    _, mins, scales = quantize(x, 3, "channel", 10)
    lo = x.reshape(-1, 10, 192).amin(1).reshape(-1)
    hi = x.reshape(-1, 10, 192).amax(1).reshape(-1)
    assert (mins.float() <= lo).all()
    assert (mins.float() + 7 * scales.float() >= hi).all()


def test_constant_group_is_exact():
    x = torch.full((8, 1, 4), 3.25)
    codes, mins, scales = quantize(x, 2, "channel", 8)
    assert torch.equal(dequantize(codes, mins, scales, x.shape, "channel", 8), x)


@pytest.mark.parametrize("value", [1e6, -1e6, float("inf"), float("nan")])
def test_out_of_fp16_range_gives_non_finite_stats(value):
    x = torch.ones(4, 1, 4)
    x[2, 0, 1] = value
    _, mins, scales = quantize(x, 4, "channel", 4)
    assert not (torch.isfinite(mins).all() and torch.isfinite(scales).all())


@pytest.mark.parametrize("dim", [1, 2, 64, 128])
def test_hadamard_is_orthonormal_and_self_inverse(dim):
    x = torch.randn(5, 3, dim, generator=torch.Generator().manual_seed(dim))
    y = hadamard_(x.clone())
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(hadamard_(y.clone()), x, atol=1e-5)
    # against the dense Sylvester matrix
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    assert torch.allclose(y, x @ h / math.sqrt(dim), atol=1e-5)

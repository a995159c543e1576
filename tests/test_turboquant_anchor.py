"""research/turboquant_anchor.py's emulation of vLLM's TurboQuant presets, against vLLM itself:
its page-size computation, its Hadamard and Lloyd-Max tables, its boundary layers, and its own
store and dequant Triton kernels (run in Triton's interpreter on the CPU: vLLM's CPU build turns
Triton off in ``vllm.triton_utils``, so the kernels' source is loaded with the real Triton in its
place). Random tensors, no model.
"""

import linecache
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "research"))

import turboquant_anchor as tq

HEADS_DIMS = [(3, 64), (1, 256), (8, 128)]  # SmolLM2, Gemma 3 270M, a Llama-like head


def _kv(tokens: int, heads: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with per-channel scales and an outlier channel (as RoPE'd keys have), values plain."""
    g = torch.Generator().manual_seed(seed)
    channel = torch.rand(dim, generator=g) * 2 + 0.2
    channel[3] = 8.0
    k = torch.randn(tokens, heads, dim, generator=g) * channel
    v = torch.randn(tokens, heads, dim, generator=g) + 0.3
    return k.bfloat16(), v.bfloat16()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("preset", tq.PRESETS)
@pytest.mark.parametrize("heads,dim", HEADS_DIMS)
def test_page_bytes_are_vllms(preset, heads, dim):
    from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    spec = FullAttentionSpec(
        block_size=1, num_kv_heads=heads, head_size=dim, dtype=torch.bfloat16, kv_quant_mode=get_kv_quant_mode(preset)
    )
    tq_page = TurboQuantAttentionBackend.customize_spec(spec).page_size_bytes
    bf16_page = FullAttentionSpec(block_size=1, num_kv_heads=heads, head_size=dim, dtype=torch.bfloat16).page_size_bytes
    anchor = tq.Anchor(preset, 6, heads, dim, bf16_layers=(0, 5))
    assert anchor.bytes_per_token() == 4 * tq_page + 2 * bf16_page
    k, v = _kv(7, heads, dim)
    slot = tq.store(anchor.cfg, k, v)
    assert slot.shape == (7, heads, tq_page // heads)
    _, nbytes = anchor.roundtrip([(k, v)] * 6)
    assert nbytes == 7 * anchor.bytes_per_token()
    assert math.isclose(8 * nbytes / (6 * 7 * heads * 2 * dim), anchor.bits_per_element())


def test_slot_sizes_by_hand():
    # key packed + value packed (+ fp16 norm, fp16 scale and min), rounded up to even, for D = 64
    assert [tq.config(p, 64).slot_size_aligned for p in tq.PRESETS] == [64 + 36, 34 + 36, 26 + 36, 26 + 28]
    assert [tq.config(p, 256).slot_size_aligned for p in tq.PRESETS] == [256 + 132, 130 + 132, 98 + 132, 98 + 100]


def test_boundary_layers_stay_bit_exact():
    assert tq.boundary_layers(30) == [0, 1, 28, 29]
    assert tq.boundary_layers(18) == [0, 1, 16, 17]
    assert tq.boundary_layers(3) == [0, 2]  # never more than half the layers
    kv = [_kv(9, 2, 64, seed=i) for i in range(6)]
    anchor = tq.Anchor("turboquant_3bit_nc", 6, 2, 64, bf16_layers=tuple(tq.boundary_layers(6)))
    out, _ = anchor.roundtrip(kv)
    for layer, ((k, v), (k2, v2)) in enumerate(zip(kv, out)):
        if layer in (0, 1, 4, 5):
            assert k2.dtype == torch.bfloat16 and torch.equal(k, k2) and torch.equal(v, v2)
        else:
            assert not torch.equal(k.float(), k2) and not torch.equal(v.float(), v2)


def test_hadamard_is_vllms():
    from vllm.v1.attention.backends.turboquant_attn import _build_hadamard

    for d in (64, 128, 256):
        h = tq.hadamard(d)
        assert torch.equal(h, _build_hadamard(d, "cpu"))
        torch.testing.assert_close(h @ h, torch.eye(d), atol=1e-5, rtol=0)  # orthonormal and symmetric


@pytest.mark.parametrize("dim", [64, 256])
@pytest.mark.parametrize("bits", [3, 4])
def test_centroids_are_vllms_lloyd_max(dim, bits):
    from vllm.model_executor.layers.quantization.turboquant.centroids import solve_lloyd_max

    cfg = tq.TurboQuantConfig(head_dim=dim, key_quant_bits=bits, value_quant_bits=4)
    centroids, midpoints = tq.tables(cfg)
    expected, boundaries = solve_lloyd_max(dim, bits)
    assert torch.equal(centroids, expected) and len(centroids) == 2**bits
    torch.testing.assert_close(midpoints, boundaries)
    assert torch.all(centroids[1:] > centroids[:-1])
    torch.testing.assert_close(centroids, -centroids.flip(0), atol=1e-6, rtol=0)  # symmetric about 0
    # Lloyd-Max for N(0, 1/D): each centroid is its cell's conditional mean (checked on samples)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) / math.sqrt(dim)
    cell = torch.searchsorted(midpoints, x, right=True)
    means = torch.stack([x[cell == i].mean() for i in range(len(centroids))])
    torch.testing.assert_close(means, centroids, atol=0.02 / math.sqrt(dim), rtol=0.02)


@pytest.mark.parametrize("bits", [3, 4])
def test_packing_roundtrips(bits):
    idx = torch.randint(0, 2**bits, (5, 2, 64), generator=torch.Generator().manual_seed(bits))
    packed = tq._pack(idx, bits)
    assert packed.shape == (5, 2, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(tq._unpack(packed, bits, 64), idx.to(torch.int32))


@pytest.mark.parametrize("heads,dim", HEADS_DIMS)
def test_reconstruction_error_orders_as_the_presets(heads, dim):
    k, v = _kv(64, heads, dim)
    errors = {}
    for preset in tq.PRESETS:
        k2, v2 = tq.load(tq.config(preset, dim), tq.store(tq.config(preset, dim), k, v))
        errors[preset] = (_rel(k2, k), _rel(v2, v))
    k8, k4, k3, b3 = (errors[p] for p in tq.PRESETS)
    assert k8[0] < 0.05  # fp8 e4m3 keys: about 2-3 % relative error
    assert k8[0] < 0.3 * k3[0] and k4[0] < 0.75 * k3[0]  # 3-bit Lloyd-Max keys lose ~4x more
    assert 0.05 < k3[0] < 0.35
    assert k8[1] == k4[1] == k3[1]  # the same 4-bit values in each
    assert k8[1] < 0.15 and b3[1] > 1.5 * k8[1]  # and 3-bit values are worse
    # norm correction: the read-back key has the stored norm to fp16 precision
    k2, _ = tq.load(tq.config("turboquant_4bit_nc", dim), tq.store(tq.config("turboquant_4bit_nc", dim), k, v))
    torch.testing.assert_close(k2.norm(dim=-1), k.float().norm(dim=-1), rtol=2e-3, atol=0)


def test_fp8_keys_saturate_and_round_to_nearest_even():
    k = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    k[0, 0, :5] = torch.tensor([500.0, -460.0, 1.0625, -1.1875, 0.0])
    cfg = tq.config("turboquant_k8v4", 64)
    k2, _ = tq.load(cfg, tq.store(cfg, k, torch.zeros_like(k)))
    assert k2[0, 0, :5].tolist() == [448.0, -448.0, 1.0, -1.25, 0.0]


# ---------------------------------------------------------------------------------------------
# against vLLM's own Triton kernels

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py where there is no GPU
DEVICE = "cpu" if INTERPRET else "cuda"


def _vllm_kernels(rel: str) -> types.ModuleType:
    """A module of vLLM's TurboQuant Triton source, bound to the real Triton (in its interpreter on
    the CPU). Line-for-line substitutions only, so Triton's source lookups find the same lines."""
    pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("no GPU, and Triton was imported without TRITON_INTERPRET=1")
    import vllm

    path = Path(vllm.__file__).parent / rel
    src = path.read_text()
    for old, new in {
        "from vllm.triton_utils import tl, triton": "import triton; import triton.language as tl",
        "from vllm.v1.attention.ops.triton_turboquant_decode import _use_fp8_e4b15": "_use_fp8_e4b15 = lambda d=0: 0",
        "from vllm.platforms import current_platform": "current_platform = None",
        "from vllm.v1.attention.ops.triton_decode_attention import (": "if False: from x import (",
    }.items():
        src = src.replace(old, new)
    name = f"<vllm-triton:{rel}>"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    module = types.ModuleType(name)
    module.__file__ = name
    exec(compile(src, name, "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("heads,dim", [(2, 64), (1, 256)])
@pytest.mark.parametrize("preset", tq.PRESETS)
def test_store_and_dequant_are_vllms_kernels(preset, heads, dim):
    store = _vllm_kernels("v1/attention/ops/triton_turboquant_store.py")
    decode = _vllm_kernels("v1/attention/ops/triton_turboquant_decode.py")
    tokens, block = 6, 16
    cfg = tq.config(preset, dim)
    k, v = _kv(tokens, heads, dim, seed=3)
    k[0, 0, 5] = 2.0**-7 * 1.0625  # a tie for fp8 and tiny values
    centroids, midpoints = tq.tables(cfg)
    pi = tq.hadamard(dim)
    cache = torch.zeros(1, block, heads, cfg.slot_size_aligned, dtype=torch.uint8, device=DEVICE)
    store.triton_turboquant_store(
        k.to(DEVICE),
        v.to(DEVICE),
        cache,
        torch.arange(tokens, dtype=torch.int32, device=DEVICE),
        pi.to(DEVICE),
        midpoints.to(DEVICE),
        mse_bits=cfg.key_mse_bits,
        key_packed_size=cfg.key_packed_size,
        value_quant_bits=cfg.value_quant_bits,
        key_fp8=cfg.key_fp8,
    )
    theirs = cache[0, :tokens].cpu()
    ours = tq.store(cfg, k, v)
    # Triton's interpreter rounds fp32 -> fp8 wrongly (1.984 -> 1.0); a GPU's cvt.rn.satfinite is
    # what tq.store emulates (test_fp8_keys_saturate_and_round_to_nearest_even): compare fp8 key
    # bytes on a GPU only
    first = dim if cfg.key_fp8 and INTERPRET else 0
    assert torch.equal(theirs[..., first:], ours[..., first:])

    out_k = torch.zeros(1, heads, block, dim, dtype=torch.float16, device=DEVICE)
    out_v = torch.zeros_like(out_k)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    cache[0, :tokens] = ours.to(DEVICE)
    decode._tq_full_dequant_kv[(block, heads)](
        cache,
        table,
        centroids.to(DEVICE),
        out_k,
        out_v,
        *out_k.stride()[:3],
        *out_v.stride()[:3],
        *cache.stride()[:3],
        table.stride(0),
        HEAD_DIM=dim,
        BLOCK_SIZE=block,
        NUM_KV_HEADS=heads,
        MSE_BYTES=math.ceil(dim * cfg.key_mse_bits / 8),
        KPS=cfg.key_packed_size,
        VQB=cfg.value_quant_bits,
        VAL_DATA_BYTES=math.ceil(dim * cfg.value_quant_bits / 8),
        MSE_BITS=cfg.key_mse_bits,
        KEY_FP8=int(cfg.key_fp8),
        BLOCK_D=dim,
        NORM_CORRECTION=int(cfg.norm_correction),
    )
    k_theirs = out_k[0, :, :tokens].transpose(0, 1).float().cpu()  # fp16, still rotated
    v_theirs = out_v[0, :, :tokens].transpose(0, 1).float().cpu()
    k_ours, v_ours = tq.load(cfg, ours)
    torch.testing.assert_close(v_ours.half().float(), v_theirs, rtol=0, atol=0)
    if not cfg.key_fp8:
        k_theirs = k_theirs @ pi  # the continuation-prefill path's inverse rotation (k @ Pi)
        torch.testing.assert_close(k_ours, k_theirs, rtol=2e-3, atol=2e-3 * float(k.float().abs().max()))
    elif not INTERPRET:
        torch.testing.assert_close(k_ours, k_theirs, rtol=0, atol=0)

"""vLLM's TurboQuant KV-cache presets as rate-distortion anchors on the quality harness's windows.

vLLM (0.32) ships four ``--kv-cache-dtype`` presets (``TQ_PRESETS`` in
vllm/model_executor/layers/quantization/turboquant/config.py); a disaggregated deployment with
NixlConnector moves the packed pages as they are, so their bytes are what a P/D transfer costs.
Each preset is emulated here on the CPU in float32 torch, byte for byte as vLLM's store kernel writes
a page slot and as its decode kernel reads it back (the NVIDIA path: the array-of-structs slot of
vllm/v1/attention/ops/triton_turboquant_store.py and triton_turboquant_decode.py; the
struct-of-arrays layout of turboquant_soa/ is only for AMD's FlyDSL decode):

- keys, ``turboquant_k8v4``: each element cast to FP8 E4M3 (no scale; Hopper's ``e4nv``, with
  saturation), 1 byte per element;
- keys, the ``_nc`` presets (4 or 3 bits): the fp32 key's L2 norm ``n``; the unit vector rotated by
  the orthonormal Sylvester Hadamard matrix (no random signs, the same matrix in every layer);
  each coordinate bucketed to the nearest Lloyd-Max centroid of N(0, 1/head_dim) with 2^bits levels;
  indices packed (2 per byte, or 8 per 3 bytes) + ``n`` as fp16. Read back: the centroid vector,
  re-normalized to unit length (``_nc`` = norm correction), times the fp16 norm, rotated back;
- values, every preset: per token and KV head, asymmetric uniform over [min, max] with 16 (4-bit) or
  8 (3-bit) levels, indices packed, scale and min each stored as fp16;
- a slot of ``key bytes + value bytes`` per token per KV head, rounded up to an even number;
- the first two and the last two layers (``TurboQuantConfig.get_boundary_skip_layers``, dense
  models) stay in the model dtype, bf16: 2 bytes per element.

Bits per element = 8 x all page bytes (TurboQuant slots + bf16 boundary layers) / K and V elements,
which is what NixlConnector moves (no headers; allocator padding left out). The harness keeps the
continuation's own KV exact, as for every codec it measures: in vLLM the decode instance would
quantize those too, so these rows are a lower bound on TurboQuant's end-to-end damage.

On a sliding-window model (Gemma 3) vLLM's TurboQuant backend does not run sliding layers
(``supports_sliding_window`` is False); only with ``--kv-cache-dtype-skip-layers sliding_window`` do
they stay bf16: ``--skip-sliding`` measures that (the default quantizes every non-boundary layer).

    .venv/bin/python research/turboquant_anchor.py --model smollm2 --json research/results/turboquant_anchor.json
    .venv/bin/python research/turboquant_anchor.py --model gemma3-270m \
        --json research/results/turboquant_anchor_gemma3.json
    .venv/bin/python research/turboquant_anchor.py --model gemma3-270m --skip-sliding \
        --json research/results/turboquant_anchor_gemma3_swa_bf16.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
from vllm.model_executor.layers.quantization.turboquant.config import TQ_PRESETS, TurboQuantConfig

from cachegen_vllm.offline.model import SHIPPED, model_path
from cachegen_vllm.offline.quality import Harness, QualityResult, format_table, result_dict

PRESETS: tuple[str, ...] = tuple(TQ_PRESETS)  # turboquant_k8v4, _4bit_nc, _k3v4_nc, _3bit_nc
BOUNDARY_LAYERS = 2  # get_boundary_skip_layers' default n, as vllm/engine/arg_utils.py calls it
FP8_MAX = 448.0  # float8 e4m3fn; Triton's fp32 -> fp8e4nv cast saturates (cvt.rn.satfinite)

KV = list[tuple[torch.Tensor, torch.Tensor]]


def config(preset: str, head_dim: int) -> TurboQuantConfig:
    """vLLM's own config of the preset: bit widths, norm correction, slot layout."""
    return TurboQuantConfig.from_cache_dtype(preset, head_dim)


@cache
def hadamard(head_dim: int) -> torch.Tensor:
    """The rotation, fp32 [D, D]: orthonormal Sylvester Hadamard, symmetric (Pi = PiT = H).

    Copied from vllm/v1/attention/backends/turboquant_attn.py, ``_build_hadamard_cached`` (importing
    that backend pulls in the attention stack); tests/test_turboquant_anchor.py checks it equals
    vLLM's. ``_ensure_on_device`` there shares it across layers, with no random signs."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim {head_dim} is not a power of two: vLLM's Hadamard is Sylvester's")
    h = torch.tensor([[1.0]])
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(head_dim)


def tables(cfg: TurboQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, midpoints) as ``TurboQuantAttentionImpl._ensure_on_device`` derives them:
    vLLM's Lloyd-Max centroids of N(0, 1/D) at ``centroid_bits``, midpoints of the sorted ones."""
    centroids = get_centroids(cfg.head_dim, cfg.centroid_bits).to(torch.float32)
    c_sorted, _ = centroids.sort()
    return centroids, (c_sorted[:-1] + c_sorted[1:]) / 2


def boundary_layers(num_layers: int, n: int = BOUNDARY_LAYERS) -> list[int]:
    """Layers vLLM keeps in the model dtype: ``TurboQuantConfig.get_boundary_skip_layers`` of a
    dense (non-hybrid) model, called on a stand-in for its ModelConfig."""
    model_config = SimpleNamespace(is_hybrid=False, hf_text_config=SimpleNamespace(num_hidden_layers=num_layers))
    return sorted(int(i) for i in TurboQuantConfig.get_boundary_skip_layers(model_config, n))  # type: ignore[arg-type]


def bf16_bytes_per_head(head_dim: int) -> int:
    """An unquantized (skip) layer's bytes per token per KV head: K and V in bf16."""
    return 2 * head_dim * 2


# ---------------------------------------------------------------------------------------------
# bit packing, as the Triton kernels lay bytes out


def _pack(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] integer indices -> [..., ceil(D * bits / 8)] uint8. 4 bits: element 2j in the low
    nibble of byte j; 3 bits: each 8 elements as a 24-bit little-endian word (element i at bit 3i),
    the stores of ``_tq_fused_store_mse`` and ``_store_quantized_value``."""
    idx = idx.to(torch.int32)
    if bits == 4:
        pairs = idx.reshape(*idx.shape[:-1], -1, 2)
        return ((pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)).to(torch.uint8)
    if bits == 3:
        groups = idx.reshape(*idx.shape[:-1], -1, 8) & 0x7
        word = (groups << (3 * torch.arange(8, dtype=torch.int32))).sum(-1, dtype=torch.int32)
        return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], -1).flatten(-2).to(torch.uint8)
    raise ValueError(f"TurboQuant packs 3 or 4 bits, not {bits}")


def _unpack(data: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """The decode kernels' read: element d from the 16 bits at byte (d * bits) // 8, shifted by
    (d * bits) % 8 (``_tq_decode_stage1``, ``_tq_full_dequant_kv``)."""
    raw = torch.cat([data, torch.zeros_like(data[..., :1])], -1).to(torch.int32)
    offset = torch.arange(head_dim) * bits
    byte, shift = offset // 8, offset % 8
    raw16 = raw[..., byte] | (raw[..., byte + 1] << 8)
    return (raw16 >> shift) & ((1 << bits) - 1)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[...] fp32 -> [..., 2] uint8: fp16, little-endian (``.to(tl.float16)``, two byte stores)."""
    return x.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def _f16_read(data: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] fp32."""
    return data.contiguous().view(torch.float16).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------
# store and load of one layer's page slots


def store(cfg: TurboQuantConfig, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One layer's K and V ``[tokens, kv heads, D]`` (bf16) -> the page slots vLLM writes,
    ``[tokens, kv heads, slot_size_aligned]`` uint8: ``[key packed | value packed | pad]``.

    The fp32 math of ``triton_turboquant_store`` (vllm/v1/attention/ops/triton_turboquant_store.py):
    its launcher's normalize + rotation, ``_tq_fused_store_mse``'s bucketize (binary search over the
    midpoints = searchsorted right) and norm store, ``_tq_fused_store_fp8``'s cast, and
    ``_store_quantized_value`` for values."""
    n, h, d = key.shape
    if d != cfg.head_dim or d % 8:
        raise ValueError(f"head_dim {d}: the config's is {cfg.head_dim}, and the 3-bit packing needs a multiple of 8")
    slot = torch.zeros(n, h, cfg.slot_size_aligned, dtype=torch.uint8)
    # keys
    if cfg.key_fp8:
        k = key.float().clamp(-FP8_MAX, FP8_MAX)  # satfinite, then round to nearest even
        slot[..., :d] = k.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        k_flat = key.float().reshape(n * h, d)
        norms = k_flat.norm(dim=1, keepdim=True)
        x_hat = k_flat / (norms + 1e-8)
        y = x_hat @ hadamard(d)  # y = x_hat @ PiT
        _, midpoints = tables(cfg)
        idx = torch.searchsorted(midpoints, y.contiguous(), right=True).clamp_max(cfg.n_centroids - 1)
        mse_bytes = math.ceil(d * cfg.key_mse_bits / 8)
        slot[..., :mse_bytes] = _pack(idx, cfg.key_mse_bits).reshape(n, h, mse_bytes)
        slot[..., mse_bytes : mse_bytes + 2] = _f16_bytes(norms.reshape(n, h))
    # values
    bits, levels = cfg.value_quant_bits, (1 << cfg.value_quant_bits) - 1
    v = value.float()
    v_min, v_max = v.amin(-1), v.amax(-1)
    scale = (v_max - v_min) / float(levels)
    scale = torch.where(scale > 1e-8, scale, torch.full_like(scale, 1e-8))
    q = ((v - v_min[..., None]) / scale[..., None] + 0.5).to(torch.int32).clamp(0, levels)  # trunc, as .to(int32)
    base, data_bytes = cfg.key_packed_size, math.ceil(d * bits / 8)
    slot[..., base : base + data_bytes] = _pack(q, bits)
    slot[..., base + data_bytes : base + data_bytes + 2] = _f16_bytes(scale)
    slot[..., base + data_bytes + 2 : base + data_bytes + 4] = _f16_bytes(v_min)
    return slot


def load(cfg: TurboQuantConfig, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Page slots -> (K, V) fp32 ``[tokens, kv heads, D]``: what ``_tq_decode_stage1`` attends over.

    It scores in the rotated space, ``norm * (q @ PiT) . c``, equal to ``q . K`` with
    ``K = norm * c @ Pi``; values are ``index * scale + min`` with the fp16 scale and min, in fp32."""
    d = cfg.head_dim
    if cfg.key_fp8:
        key = slot[..., :d].contiguous().view(torch.float8_e4m3fn).float()
    else:
        mse_bytes = math.ceil(d * cfg.key_mse_bits / 8)
        centroids, _ = tables(cfg)
        c = centroids[_unpack(slot[..., :mse_bytes], cfg.key_mse_bits, d)]
        if cfg.norm_correction:  # re-normalize the centroid vector to unit norm
            c = c * (1.0 / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16))
        norm = _f16_read(slot[..., mse_bytes : mse_bytes + 2])
        key = (norm[..., None] * c) @ hadamard(d)
    bits, base, data_bytes = cfg.value_quant_bits, cfg.key_packed_size, math.ceil(d * cfg.value_quant_bits / 8)
    v_idx = _unpack(slot[..., base : base + data_bytes], bits, d).float()
    scale = _f16_read(slot[..., base + data_bytes : base + data_bytes + 2])
    zero = _f16_read(slot[..., base + data_bytes + 2 : base + data_bytes + 4])
    return key, v_idx * scale[..., None] + zero[..., None]


# ---------------------------------------------------------------------------------------------
# a window's KV through a preset, and the harness rows


@dataclass(frozen=True)
class Anchor:
    """A preset on one model: which layers it quantizes, and its page bytes."""

    preset: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bf16_layers: tuple[int, ...]  # boundary layers (and sliding ones with skip_sliding)

    @property
    def cfg(self) -> TurboQuantConfig:
        return config(self.preset, self.head_dim)

    @property
    def name(self) -> str:
        return self.preset

    def bytes_per_token(self) -> int:
        """Page bytes one token takes over all layers: slot_size_aligned per KV head in a
        TurboQuant layer, 2 bytes per K and V element in a bf16 one."""
        slot, bf16 = self.cfg.slot_size_aligned, bf16_bytes_per_head(self.head_dim)
        return sum(self.num_kv_heads * (bf16 if i in self.bf16_layers else slot) for i in range(self.num_layers))

    def bits_per_element(self) -> float:
        return 8 * self.bytes_per_token() / (self.num_layers * self.num_kv_heads * 2 * self.head_dim)

    def roundtrip(self, kv: KV) -> tuple[KV, int]:
        """A window's KV as vLLM's decode reads it back, and the page bytes it moved."""
        out: KV = []
        nbytes = 0
        cfg = self.cfg
        for layer, (k, v) in enumerate(kv):
            if layer in self.bf16_layers:
                out.append((k, v))
                nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
                continue
            slot = store(cfg, k, v)
            nbytes += slot.numel()
            out.append(load(cfg, slot))
        return out, nbytes


def sliding_layers(model_config) -> list[int]:
    """Sliding-window layers of a transformers config (``layer_types``), none if it has none."""
    types = getattr(model_config, "layer_types", None) or []
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def anchors(harness: Harness, presets: Iterable[str] = PRESETS, skip_sliding: bool = False) -> list[Anchor]:
    g = harness.geometry
    bf16 = set(boundary_layers(g.num_layers))
    if skip_sliding:
        bf16 |= set(sliding_layers(harness.model.config))
    return [Anchor(p, g.num_layers, g.num_kv_heads, g.head_dim, tuple(sorted(bf16))) for p in presets]


def turboquant_rows(
    harness: Harness,
    presets: Sequence[str] = PRESETS,
    skip_sliding: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[QualityResult]:
    """The presets measured on ``harness`` (other research scripts import the anchor from here)."""
    results = []
    for anchor in anchors(harness, presets, skip_sliding):
        if log:
            log(anchor.name)
        name = anchor.name + ("+swa-bf16" if skip_sliding and sliding_layers(harness.model.config) else "")
        results.append(harness.measure(name, anchor.roundtrip))
    return results


def layout_rows(harness: Harness, presets: Iterable[str] = PRESETS, skip_sliding: bool = False) -> list[dict]:
    """What vLLM stores for each preset on this model (the JSON's per-row description)."""
    rows = []
    for a in anchors(harness, presets, skip_sliding):
        cfg = a.cfg
        rows.append(
            dict(
                preset=a.preset,
                key_path="fp8 e4m3, 1 B/elem"
                if cfg.key_fp8
                else f"{cfg.key_mse_bits}-bit Lloyd-Max after Hadamard + fp16 norm",
                value_path=f"{cfg.value_quant_bits}-bit uniform per token and head, fp16 scale + fp16 min",
                norm_correction=cfg.norm_correction,
                bf16_layers=list(a.bf16_layers),
                slot_bytes_per_kv_head=cfg.slot_size_aligned,
                tq_layer_bits_per_element=8 * cfg.slot_size_aligned / (2 * a.head_dim),
                page_bytes_per_token=a.bytes_per_token(),
                page_bits_per_element=a.bits_per_element(),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help=f"{' or '.join(SHIPPED)}, or a checkpoint directory")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--continuation-tokens", type=int, default=128)
    parser.add_argument("--greedy-tokens", type=int, default=0)
    parser.add_argument("--corpus", choices=["language-reference", "python-source"], default="language-reference")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument(
        "--skip-sliding", action="store_true", help="keep sliding-window layers bf16 (what vLLM can run on Gemma 3)"
    )
    parser.add_argument("--json", type=Path, help="e.g. research/results/turboquant_anchor.json")
    args = parser.parse_args()
    started = time.perf_counter()
    corpus = None
    if args.corpus == "python-source":
        from basis_study import python_source

        corpus = python_source()
    model_dir = model_path(args.model)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    tokens = f"{args.context_tokens}+{args.continuation_tokens}"
    log(f"preparing {args.windows} windows of {tokens} tokens on {model_dir.name}")
    harness = Harness(
        model_dir, args.windows, args.context_tokens, args.continuation_tokens, args.greedy_tokens, corpus=corpus
    )
    layouts = layout_rows(harness, args.presets, args.skip_sliding)
    for row in layouts:
        log(
            f"{row['preset']:<20} slot {row['slot_bytes_per_kv_head']} B/head/token, bf16 layers {row['bf16_layers']}, "
            f"{row['page_bits_per_element']:.3f} bits/elem"
        )
    results = turboquant_rows(harness, args.presets, args.skip_sliding, log=log)
    for layout, result in zip(layouts, results):
        # the bytes counted in the roundtrip are the page bytes vLLM's layout gives
        assert math.isclose(layout["page_bits_per_element"], result.bits_per_element, rel_tol=1e-9), (layout, result)
    print(format_table(results))
    if args.json:
        import vllm

        args.json.parent.mkdir(parents=True, exist_ok=True)
        setup = dict(
            model=model_dir.name,
            windows=args.windows,
            context_tokens=args.context_tokens,
            continuation_tokens=args.continuation_tokens,
            greedy_tokens=args.greedy_tokens,
            kv_dtype="bfloat16",
            texts="pydoc_data.topics (CPython language reference)"
            if corpus is None
            else "Python standard library source",
            vllm=vllm.__version__,
            skip_sliding=args.skip_sliding,
            seconds=round(time.perf_counter() - started, 1),
        )
        rows = [dict(result_dict(r), family="turboquant", **layout) for r, layout in zip(results, layouts)]
        args.json.write_text(json.dumps(dict(setup=setup, results=rows), indent=1) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Which basis to entropy-code KV in: the measurement behind ``rotation = "basis"`` (codec/basis.py).

On the embedded model, with the entropy-coded quantizer at equal key and value widths (the
smollm2-basis profile's tiers), every byte counted, KL and dNLL on the quality harness's windows:

- ``hadamard``: the per-head Walsh-Hadamard rotation (the `entropy` profile);
- ``pca``: each head's principal components (a basis fitted with the identity as metric);
- ``metric``: the shipped construction, principal components in the model's metric (queries for
  keys, the output projection for values), at several regularizations;
- the same on text of another kind (Python source from the standard library: code, not prose),
  with the basis still fitted on the language reference: does it carry over?
- how far the shipped basis's coefficients reach, in standard deviations of their tensor (per
  256-token chunk, sinks left out): why basis frames code with a wider alphabet.

Bases are fitted on windows between the quality windows (`cachegen-vllm basis`'s defaults).

    .venv/bin/python research/basis_study.py --json research/results/basis_study.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from cachegen_vllm.codec.basis import REGULARIZATION, fit, save
from cachegen_vllm.codec.basis import load as load_basis
from cachegen_vllm.config import load_profile
from cachegen_vllm.fitting.basis import basis_statistics
from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.offline.quality import Harness, result_dict

WIDTHS = (2, 3)


def python_source(limit_chars: int = 2_000_000) -> str:
    """Python standard library source (every machine with Python has it): a held-out text kind."""
    text, root = [], Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        text.append(path.read_text(errors="ignore"))
        if sum(map(len, text)) > limit_chars:
            break
    return "\n\n".join(text)


def coefficient_peaks(harness: Harness, basis) -> torch.Tensor:
    """max |y - centre| / sigma of each (window, layer, K/V, 256-token chunk) in the basis, sigma
    over the chunk's whole tensor as the quantizer's step is."""
    peaks = []
    for kv in harness.exact_kv:
        for layer, tensors in enumerate(kv):
            for t, x in enumerate(tensors):
                for chunk in x[4:].float().split(256):
                    y = basis.apply(chunk, layer, t).reshape(len(chunk), -1)
                    d = y - y.mean(0)
                    peaks.append(float(d.abs().max() / d.pow(2).mean().sqrt()))
    return torch.tensor(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    model_dir = ensure_default_model()
    fitting = Harness(model_dir, args.windows, 1151, 1, 0, offset=1152)  # between the quality windows
    covariance, metric = basis_statistics(fitting, chunk_tokens=256, skip_tokens=4)
    del fitting
    base = load_profile("smollm2-basis")
    tmp = Path(tempfile.mkdtemp())
    variants = {"hadamard": dataclasses.replace(base, rotation="hadamard", basis=None)}
    identity = torch.eye(metric.shape[-1], dtype=torch.float64).expand(metric.shape)
    for name, m, reg in [
        ("pca", identity, REGULARIZATION),
        ("metric", metric, REGULARIZATION),
        ("metric, reg 0.01", metric, 0.01),
        ("metric, reg 1", metric, 1.0),
    ]:
        path = tmp / f"{len(variants)}.safetensors"
        save(fit(covariance, m, reg), path)
        variants[name] = dataclasses.replace(base, basis=str(path))
    rows, peaks = [], []
    for corpus_name, corpus in (("language reference", None), ("python source", python_source())):
        harness = Harness(model_dir, args.windows, 1024, 128, 0, corpus=corpus)
        if corpus is None:
            peaks = coefficient_peaks(harness, load_basis(base.basis))
            print(
                f"shipped basis: max |coefficient - centre| / sigma per chunk: median {peaks.median():.1f}, "
                f"99th percentile {peaks.quantile(0.99):.1f}, max {peaks.max():.1f}",
                flush=True,
            )
        for name, profile in variants.items():
            if corpus is not None and name not in ("hadamard", "metric"):
                continue
            for bits in WIDTHS if "reg" not in name else (3,):
                p = dataclasses.replace(profile, name=f"{name} k{bits} v{bits}", key_bits=bits, value_bits=bits)
                r = harness.evaluate(p)
                rows.append(dict(corpus=corpus_name, basis=name, bits=bits, **result_dict(r)))
                print(
                    f"{corpus_name:<20}{name:<18}{bits:>3}-bit {r.bits_per_element:7.3f} bits/elem  KL {r.kl:.4f}  "
                    f"dNLL {r.delta_nll:+.4f}",
                    flush=True,
                )
    if args.json:
        setup = dict(
            windows=args.windows,
            context_tokens=1024,
            continuation_tokens=128,
            base="smollm2-basis",
            seconds=round(time.perf_counter() - started),
        )
        peak = dict(median=float(peaks.median()), p99=float(peaks.quantile(0.99)), max=float(peaks.max()))
        args.json.write_text(json.dumps(dict(setup=setup, rows=rows, coefficient_peak_sigmas=peak), indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

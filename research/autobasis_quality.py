"""The automatic basis (profile `basis = "auto"`, cachegen_vllm/fitting/auto.py) against the
hand-fitted one shipped for the embedded model: the fit's time and memory, and bits per element
and KL of both at the smollm2-basis profile's tiers with 2- and 3-bit widths, on the quality
windows of the language reference and on Python source (another kind of text than either basis
was fitted on). Bits at equal KL: each basis's bits interpolated at the shipped basis's KL
(log KL linear in bits between the 2- and 3-bit points).

    .venv/bin/python research/autobasis_quality.py --json research/results/autobasis_quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import time
from pathlib import Path

from basis_study import python_source

from cachegen_vllm.config import load_profile
from cachegen_vllm.fitting import auto as autobasis
from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.offline.quality import Harness, result_dict

WIDTHS = (2, 3)


def bits_at(kl: float, points: list[tuple[float, float]]) -> float:
    """Bits at ``kl`` on the line through two (bits, KL) points, log KL linear in bits."""
    (b0, k0), (b1, k1) = points
    return b0 + (math.log(kl) - math.log(k0)) * (b1 - b0) / (math.log(k1) - math.log(k0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = ensure_default_model()
    base = load_profile("smollm2-basis")
    skip = max(t.tokens for t in base.sink)
    autobasis.basis_path(str(model_dir), base.chunk_tokens, skip).unlink(missing_ok=True)  # fit it now
    started = time.perf_counter()
    path = autobasis.fit(str(model_dir), base.chunk_tokens, skip)
    fit = dict(
        seconds=round(time.perf_counter() - started, 1),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        windows=autobasis.WINDOWS,
        context_tokens=autobasis.CONTEXT_TOKENS,
    )
    print(f"fit: {fit}", flush=True)
    rows = []
    for text, corpus in (("language reference", None), ("Python source", python_source())):
        harness = Harness(model_dir, args.windows, 1024, 128, 0, corpus=corpus)
        for basis_name, basis_file in (("shipped", base.basis), ("auto", str(path))):
            for width in WIDTHS:
                profile = dataclasses.replace(
                    base, name=f"{basis_name}-{width}", key_bits=width, value_bits=width, basis=basis_file
                )
                r = result_dict(harness.evaluate(profile))
                rows.append(dict(text=text, basis=basis_name, width=width, **r))
                print(
                    f"{text:<19} {basis_name:<8} {width} {r['bits_per_element']:.3f} bits KL {r['kl']:.4f}", flush=True
                )
    equal_kl = []
    for text in ("language reference", "Python source"):
        points = {
            b: [(r["bits_per_element"], r["kl"]) for r in rows if r["text"] == text and r["basis"] == b]
            for b in ("shipped", "auto")
        }
        for width, (bits, kl) in zip(WIDTHS, points["shipped"]):
            auto_bits = bits_at(kl, points["auto"])
            equal_kl.append(dict(text=text, width=width, kl=kl, shipped_bits=bits, auto_bits=round(auto_bits, 3)))
            print(f"{text:<19} at KL {kl:.4f}: shipped {bits:.3f}, auto {auto_bits:.3f} bits", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(fit=fit, rows=rows, equal_kl=equal_kl), indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Rate-distortion of every profile and anchor on the embedded model: one table, one JSON, one plot.

Rows (the quality harness of `cachegen-vllm quality`: 1K-token windows of the CPython language
reference, teacher-forced 128-token continuations, every frame byte counted):

- the shipped profiles, packed and entropy-coded (rans, in the Hadamard rotation or in a calibrated
  basis), and sweeps of both entropy-coded quantizers at equal key and value widths;
- anchors (research/anchors/): KIVI-style 4- and 2-bit, per-channel int8; vLLM's TurboQuant pages
  (research/turboquant_anchor.py);
- where the bytes of the entropy-coded profile go (tables, statistics, lanes, streams);
- LMCache's own CacheGen serializer, measured on the same windows by research/lmcache_anchor.py in
  its own environment (lmcache pins numpy<=2.2.6), read from its JSON if given.

    .venv/bin/python research/rate_distortion.py --lmcache research/results/lmcache_cachegen.json \
        --json research/results/rate_distortion.json --plot research/results/rate_distortion.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import xxhash
from turboquant_anchor import PRESETS, anchors

from cachegen_vllm.config import load_profile, shipped_profiles
from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.offline.quality import Harness, QualityResult, format_table, result_dict

ANCHORS = Path(__file__).parent / "anchors"
PROFILES = Path(__file__).parent / "profiles"  # research-only profiles (superseded calibrations)
SWEEP = [1, 2, 3, 5]  # every layer's key and value at this width, in the Hadamard rotation and in the basis
SWEEPS = {"rans sweep": "entropy", "basis sweep": "smollm2-basis"}  # family: the profile swept


def rows() -> list[tuple[str, object]]:
    """(family, profile) of every measured row: every shipped and research profile but raw, the
    sweeps, the anchors."""
    # "basis" fits on the checkpoint: the same widths as smollm2-basis, measured in autobasis_quality.py
    shipped = [load_profile(name) for name in shipped_profiles() if name != "raw" and name != "basis"]
    shipped += [load_profile(path) for path in sorted(PROFILES.glob("*.toml"))]
    out = [("packed" if p.coding == "packed" else "rans + basis" if p.basis else "rans", p) for p in shipped]
    for family, name in SWEEPS.items():
        base = load_profile(name)
        out += [(family, dataclasses.replace(base, name=f"{name} k{b} v{b}", key_bits=b, value_bits=b)) for b in SWEEP]
    out += [("anchor", load_profile(path)) for path in sorted(ANCHORS.glob("*.toml"))]
    return out


def _key(profile, args) -> str:
    """What a row's figures depend on: the profile's every field and the harness setting."""
    return xxhash.xxh3_64_hexdigest(
        repr((profile, args.windows, args.context_tokens, args.continuation_tokens)).encode()
    )


def byte_shares(harness: Harness, profile) -> dict[str, float]:
    """Where a rans profile's bytes go, over the harness's windows: shares of all frame bytes."""
    from cachegen_vllm.codec import encode_layer
    from cachegen_vllm.codec.format import parse_frame, tensor_arrays

    names = ["centers", "table ids", "step", "lane states", "lane word counts", "rans streams"]
    totals = dict.fromkeys(["frame header, segment table, checksum, padding", "exact tokens (sinks)", *names], 0)
    for kv in harness.exact_kv:
        for layer, (k, v) in enumerate(kv):
            for frame in encode_layer(k, v, geometry=harness.geometry, profile=profile, layer=layer):
                header = parse_frame(frame, harness.geometry)
                counted = 0
                for seg_sizes in tensor_arrays(header, harness.geometry):
                    for sizes in seg_sizes:
                        if len(sizes) == 1:
                            totals["exact tokens (sinks)"] += sizes[0]
                        else:
                            for name, n in zip(names, sizes):
                                totals[name] += n
                        counted += sum(sizes)
                totals["frame header, segment table, checksum, padding"] += len(frame) - counted
    total = sum(totals.values())
    return {name: round(n / total, 4) for name, n in totals.items()}


def plot(results: list[dict], path: Path) -> None:
    """Two panels on the same rows: dNLL (the target's measure, noisy near 0: symlog) and KL (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "packed": ("o", "tab:blue"),
        "rans": ("*", "tab:red"),
        "rans + basis": ("P", "tab:purple"),
        "anchor": ("s", "tab:gray"),
        "turboquant": ("v", "tab:orange"),
        "lmcache": ("D", "tab:green"),
    }
    lines = {
        "rans sweep": ("entropy", "tab:red", "rans, Hadamard"),
        "basis sweep": ("smollm2-basis", "tab:purple", "rans, basis"),
    }
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, field, label in (
        (axes[0], "delta_nll", "dNLL, nats/token (symlog; +0.01 is +1% perplexity)"),
        (axes[1], "kl", "KL(exact || compressed), nats/token (log)"),
    ):
        for family, (name, color, what) in lines.items():
            sweep = sorted(
                (r for r in results if r["family"] == family or r["profile"] == name),
                key=lambda r: r["bits_per_element"],
            )
            ax.plot(
                [r["bits_per_element"] for r in sweep],
                [r[field] for r in sweep],
                "-",
                color=color,
                alpha=0.4,
                label=f"{what}, equal widths in every layer",
            )
        for family, (marker, color) in styles.items():
            members = [r for r in results if r["family"] == family]
            if members:
                ax.scatter(
                    [r["bits_per_element"] for r in members],
                    [r[field] for r in members],
                    marker=marker,
                    color=color,
                    s=110 if marker == "*" else 45,
                    label=family,
                    zorder=3,
                )
            for r in members:
                ax.annotate(
                    r["profile"],
                    (r["bits_per_element"], r[field]),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
        if field == "kl":
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.axhline(0.00995, color="black", lw=0.6, ls="--")
        ax.set_xlabel("bits per KV element on the wire (headers, statistics, tables included)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "SmolLM2-135M, 16 windows of 1,024 + 128 tokens: rate vs damage of compressed KV (lower left is better)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _result(row: dict) -> QualityResult:
    """A QualityResult from a JSON row (null back to NaN)."""
    return QualityResult(**{k: float("nan") if v is None else v for k, v in row.items() if k not in ("family", "key")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--continuation-tokens", type=int, default=128)
    parser.add_argument("--lmcache", type=Path, help="research/lmcache_anchor.py's JSON (same windows)")
    parser.add_argument("--json", type=Path, default=Path("research/results/rate_distortion.json"))
    parser.add_argument("--plot", type=Path, default=Path("research/results/rate_distortion.png"))
    parser.add_argument("--fresh", action="store_true", help="measure every row again, even those --json already holds")
    args = parser.parse_args()
    started = time.perf_counter()
    harness = Harness(ensure_default_model(), args.windows, args.context_tokens, args.continuation_tokens, 0)
    # rows measured before with the same profile and setting are kept (--fresh measures all again)
    kept = (
        {}
        if args.fresh or not args.json.exists()
        else {r["key"]: r for r in json.loads(args.json.read_text())["results"] if "key" in r}
    )
    results: list[QualityResult] = []
    table = []
    for i, (family, profile) in enumerate(rows(), 1):
        key = _key(profile, args)
        if key in kept:
            row = kept[key]
        else:
            print(f"[{i}] {profile.name}", file=sys.stderr, flush=True)
            row = dict(result_dict(harness.evaluate(profile)), family=family, key=key)
        table.append(row)
        results.append(_result(row))
    for anchor in anchors(harness, PRESETS):  # vLLM's TurboQuant pages, measured like the rows
        key = xxhash.xxh3_64_hexdigest(
            repr((anchor.name, args.windows, args.context_tokens, args.continuation_tokens)).encode()
        )
        if key in kept:
            row = kept[key]
        else:
            print(f"[turboquant] {anchor.name}", file=sys.stderr, flush=True)
            row = dict(result_dict(harness.measure(anchor.name, anchor.roundtrip)), family="turboquant", key=key)
        table.append(row)
        results.append(_result(row))
    if args.lmcache:
        lmcache = json.loads(args.lmcache.read_text())
        results.append(_result(lmcache["result"]))
        table.append(dict(lmcache["result"], family="lmcache"))
    print(format_table(results))
    shares = byte_shares(harness, load_profile("entropy"))
    print("bytes of the entropy profile's frames: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    setup = dict(
        model=harness.geometry.model,
        windows=args.windows,
        context_tokens=args.context_tokens,
        continuation_tokens=args.continuation_tokens,
        seconds=round(time.perf_counter() - started, 1),
    )
    args.json.write_text(json.dumps(dict(setup=setup, results=table, entropy_byte_shares=shares), indent=1) + "\n")
    plot(table, args.plot)
    print(f"wrote {args.json} and {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()

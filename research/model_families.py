"""The codec on two model families against vLLM's TurboQuant pages (issue 27): keys coded before
RoPE (`pre_rope`, codec/rope.py) against the automatic basis as it was, with the anchors beside.

One model (the embedded SmolLM2-135M, or Gemma 3 270M: one KV head of 256, QK-norm, 15 of 18
layers sliding over 512 tokens), one text (the CPython language reference, which the bases are
fitted on other windows of, or Python standard-library source), one context length; 8 windows,
128-token continuations, every byte counted (the quality harness). Rows:

- anchors: vLLM's four TurboQuant presets (research/turboquant_anchor.py: the page bytes
  NixlConnector would move), KIVI-style 4-bit (research/anchors/kivi-4bit.toml);
- the shipped generic profiles `default`, `entropy`;
- `basis` (automatic; 3 bits, 5-bit recent tokens, exact sinks) with keys coded after RoPE (as it
  was) and before (``pre_rope = true``, as it ships), each also at 2 bits;
- with ``--ablations``: the pre-RoPE basis with only the keys or only the values coded (the other
  exact), to see which one's error the KL comes from.

``--rows basis`` measures only the basis rows (what the 3K-token contexts are run with).

    .venv/bin/python research/model_families.py --model gemma3-270m --ablations \
        --json research/results/families/gemma3-reference-1k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from basis_study import python_source
from turboquant_anchor import turboquant_rows

from cachegen_vllm.config import load_profile
from cachegen_vllm.fitting import auto as autobasis
from cachegen_vllm.offline.model import model_path
from cachegen_vllm.offline.quality import Harness, QualityResult, format_table, result_dict

ANCHORS = Path(__file__).parent / "anchors"
EXACT = 16


def basis_rows(model: str, ablations: bool) -> list[tuple[str, object]]:
    """(family, profile) of the basis rows, their bases fitted (or read from the cache) now."""
    base = load_profile("basis")
    post = autobasis.resolve(dataclasses.replace(base, pre_rope=False), model)
    pre = autobasis.resolve(dataclasses.replace(base, pre_rope=True), model)
    pre = dataclasses.replace(pre, name="basis pre-rope")
    rows = [
        ("basis", dataclasses.replace(post, name="basis")),
        ("basis", pre),
        ("basis", dataclasses.replace(post, name="basis k2", key_bits=2, value_bits=2)),
        ("basis", dataclasses.replace(pre, name="basis pre-rope k2", key_bits=2, value_bits=2)),
    ]
    if ablations:
        rows += [
            ("ablation", dataclasses.replace(pre, name="pre-rope, keys only", value_bits=EXACT, recent=(), sink=())),
            ("ablation", dataclasses.replace(pre, name="pre-rope, values only", key_bits=EXACT, recent=(), sink=())),
            ("ablation", dataclasses.replace(post, name="post-rope, keys only", value_bits=EXACT, recent=(), sink=())),
        ]
    return rows


def bits_at_kl(points: list[tuple[float, float]], kl: float) -> float:
    """The bits a line of (bits, KL) points needs for ``kl``: log KL linear in bits between (and
    beyond) its two points."""
    (b0, k0), (b1, k1) = sorted(points)
    slope = (math.log(k1) - math.log(k0)) / (b1 - b0)
    return b0 + (math.log(kl) - math.log(k0)) / slope


def pre_rope_saving(results: list[dict]) -> dict[str, float]:
    """Bits per element the pre-RoPE basis saves at equal KL, at each of its two rows' KL."""
    rows = {r["profile"]: (r["bits_per_element"], r["kl"]) for r in results}
    post = [rows["basis"], rows["basis k2"]]
    pre = ("basis pre-rope", "basis pre-rope k2")
    return {name: round(bits_at_kl(post, rows[name][1]) - rows[name][0], 3) for name in pre}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a shipped model's name or a checkpoint directory")
    parser.add_argument("--corpus", choices=["language-reference", "python-source"], default="language-reference")
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rows", choices=["all", "basis"], default="all")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows (read with --summary)")
    parser.add_argument("--summary", action="store_true", help="print the pre-RoPE saving of --json's rows and exit")
    args = parser.parse_args()
    if args.summary:
        print(json.dumps(pre_rope_saving(json.loads(args.json.read_text())["results"])))
        return
    started = time.perf_counter()
    model = str(model_path(args.model))
    corpus = python_source() if args.corpus == "python-source" else None
    rows = basis_rows(model, args.ablations)  # fitted first: the fit runs in a process of its own
    harness = Harness(Path(model), args.windows, args.context_tokens, 128, 0, corpus=corpus)
    results = []

    def measured(family: str, result) -> None:
        results.append(dict(result_dict(result), family=family))
        print(format_table([result]).splitlines()[-1], file=sys.stderr, flush=True)

    if args.rows == "all":
        for result in turboquant_rows(harness):
            measured("turboquant", result)
        shipped = [("shipped", load_profile(name)) for name in ("default", "entropy")]
        rows = [("anchor", load_profile(ANCHORS / "kivi-4bit.toml")), *shipped, *rows]
    for family, profile in rows:
        measured(family, harness.evaluate(profile))
    setup = dict(
        model=Path(model).name,
        text=args.corpus,
        windows=args.windows,
        context_tokens=args.context_tokens,
        continuation_tokens=128,
        seconds=round(time.perf_counter() - started, 1),
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(setup=setup, results=results), indent=1) + "\n")
    print(f"bits the pre-RoPE basis saves at equal KL: {pre_rope_saving(results)}")
    nan = float("nan")  # result_dict wrote NaN as null
    print(
        format_table(
            [QualityResult(**{k: nan if v is None else v for k, v in r.items() if k != "family"}) for r in results]
        )
    )


if __name__ == "__main__":
    main()

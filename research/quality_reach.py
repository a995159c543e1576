"""Where the codec stands against issue 17's research target (at most 2.0 bits per element within
+1% perplexity, 1K- and 3K-token contexts, text of another kind than the basis was fitted on):
the basis profiles on Python standard-library source (the bases were fitted on the CPython
language reference), contexts of 1,024 and 3,072 tokens, 128-token continuations, every byte
counted.

    .venv/bin/python research/quality_reach.py --json research/results/quality_reach.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from basis_study import python_source

from cachegen_vllm.config import load_profile
from cachegen_vllm.fitting import auto as autobasis
from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.offline.quality import Harness, result_dict

PROFILES = ("smollm2-basis-calibrated", "smollm2-basis", "basis")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 3072])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = ensure_default_model()
    rows = []
    for context in args.contexts:
        harness = Harness(model_dir, args.windows, context, 128, 0, corpus=python_source())
        for name in PROFILES:
            profile = autobasis.resolve(load_profile(name), str(model_dir))
            r = result_dict(harness.evaluate(profile))
            rows.append(dict(context_tokens=context, text="Python source", **r))
            print(
                f"{context:>5} {name:<26} {r['bits_per_element']:.3f} bits, ppl {r['perplexity_change_pct']:+.2f}%, "
                f"KL {r['kl']:.4f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(dict(windows=args.windows, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()

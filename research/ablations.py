"""Which codec choices pay, measured on the embedded model's real KV through the real wire format.

Each variant quantizes only keys or only values (the other stays exact) so that their effects
separate. Prints a table and writes JSON; docs/RESULTS.md quotes the results.

    .venv/bin/python research/ablations.py --json research/results/ablations.json [--layers]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cachegen_vllm.codec.profile import EXACT_BITS
from cachegen_vllm.config import profile_from_dict
from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.offline.quality import Harness, format_table, result_dict

SINK4 = [{"tokens": 4, "key": EXACT_BITS, "value": EXACT_BITS}]


def variant(name, key, value, group=128, rotation="none", axis="token", sink=(), layers=()):
    bits = {"key": key, "value": value, "sink": list(sink), "layers": list(layers)}
    return profile_from_dict(
        {"chunk_tokens": 256, "group_tokens": group, "rotation": rotation, "value_axis": axis, "bits": bits}, name
    )


VARIANTS = [
    variant("K4", 4, EXACT_BITS),
    variant("K4 rot", 4, EXACT_BITS, rotation="hadamard"),
    variant("K4 rot g64", 4, EXACT_BITS, group=64, rotation="hadamard"),
    variant("K4 rot g64 sink4", 4, EXACT_BITS, group=64, rotation="hadamard", sink=SINK4),
    variant("K3 rot g64", 3, EXACT_BITS, group=64, rotation="hadamard"),
    variant("K3 rot g64 sink4", 3, EXACT_BITS, group=64, rotation="hadamard", sink=SINK4),
    variant("V4 per-channel", EXACT_BITS, 4, axis="channel"),
    variant("V4 per-token", EXACT_BITS, 4),
    variant("V4 per-token rot", EXACT_BITS, 4, rotation="hadamard"),
    variant("V2 per-token", EXACT_BITS, 2),
    variant("V2 per-token rot", EXACT_BITS, 2, rotation="hadamard"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--layers", action="store_true", help="also: 2-bit keys in one layer at a time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    harness = Harness(ensure_default_model(), args.windows, 1024, 128, greedy_tokens=0)
    variants = list(VARIANTS)
    if args.layers:
        last = harness.geometry.num_layers - 1
        variants += [
            variant(
                f"K2 rot layer {i}",
                EXACT_BITS,
                EXACT_BITS,
                rotation="hadamard",
                layers=[{"first": i, "last": i, "key": 2, "value": EXACT_BITS}],
            )
            for i in range(last + 1)
        ]
    results = []
    for v in variants:
        results.append(harness.evaluate(v))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "windows": args.windows,
                    "context_tokens": 1024,
                    "continuation_tokens": 128,
                    "results": [result_dict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

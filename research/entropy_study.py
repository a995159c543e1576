"""How much entropy coding can save on real KV, and with which tables (groundwork for issue 4).

On the embedded model's KV (rotated as the default profile does), for each layer and for K and V:

- the default profile's quantizers at b bits (keys: min/max per channel over groups of 64 tokens;
  values: min/max per token and head), and what an ideal entropy coder would pay for their codes
  with tables of different scope, estimated on half the windows and paid on the other half
  (cross-entropy: a table shipped with a profile cannot have seen the request);
- token deltas (CacheGen's locality: a code minus the previous token's code, per channel), of the
  min/max codes and of the uniform quantizer's;
- an entropy-coded uniform quantizer (no per-group statistics: one step for the layer's tensor,
  one table per channel) at the same mean squared error: what the same distortion costs when the
  bits follow the data's distribution instead of its range.

Bits are per element and count the codes and the per-group statistics (fp16 min and scale), not
the tables, frame headers or sink/recent tokens.

    .venv/bin/python research/entropy_study.py --json research/results/entropy_study.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from cachegen_vllm.codec.quant import dequantize, hadamard_, quantize
from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.offline.quality import Harness

GROUP = 64


def entropy_bits(train: torch.Tensor, test: torch.Tensor) -> float:
    """Mean bits per symbol to code ``test`` [n, lanes] with one table per lane estimated on
    ``train`` [m, lanes] (add-1/2 smoothing over the symbols either side shows)."""
    lo = int(min(train.min(), test.min()))
    size = int(max(train.max(), test.max())) - lo + 1
    lanes = train.shape[1]
    counts = torch.full((lanes, size), 0.5, dtype=torch.float64)
    counts.scatter_add_(1, (train - lo).T.long(), torch.ones(train.T.shape, dtype=torch.float64))
    logp = torch.log2(counts / counts.sum(1, keepdim=True))
    return float(-logp.gather(1, (test - lo).T.long()).mean())


def quantized(x: torch.Tensor, bits: int, axis: str):
    """(codes [T, C], mean squared error, statistics bits per element) of the min/max quantizer."""
    codes, mins, scales = quantize(x, bits, axis, GROUP)
    err = (dequantize(codes, mins, scales, x.shape, axis, GROUP) - x).pow(2).mean()
    stat_bits = 32 * mins.numel() / x.numel()
    return codes.view(x.shape[0], -1).long(), float(err), stat_bits


def study(harness: Harness, bits: int) -> dict:
    half = len(harness.exact_kv) // 2
    rows = {"K": [], "V": []}
    for layer in range(harness.geometry.num_layers):
        for name, index, axis in (("K", 0, "channel"), ("V", 1, "token")):
            tensors = [hadamard_(kv[layer][index].float().contiguous()) for kv in harness.exact_kv]
            train, test = tensors[:half], tensors[half:]
            q_train = [quantized(x, bits, axis) for x in train]
            q_test = [quantized(x, bits, axis) for x in test]
            c_train = torch.cat([q[0] for q in q_train])
            c_test = torch.cat([q[0] for q in q_test])
            mse = sum(q[1] for q in q_test) / len(q_test)
            stat_bits = q_test[0][2]
            # token deltas within each window, per channel (first token of a window kept as is)
            d_train = torch.cat([torch.cat([q[0][:1], q[0].diff(dim=0)]) for q in q_train])
            d_test = torch.cat([torch.cat([q[0][:1], q[0].diff(dim=0)]) for q in q_test])
            # entropy-coded uniform quantizer at the same error: one step for the tensor
            # (equal error per channel is what minimizes the rate for a squared-error target)
            flat_train, flat_test = torch.cat(train).flatten(1), torch.cat(test).flatten(1)
            mean = flat_train.mean(0)
            step = math.sqrt(12 * mse)
            for _ in range(30):  # Delta^2/12 is the high-rate estimate; correct it to the measured error
                err = ((torch.round((flat_test - mean) / step) * step + mean - flat_test).pow(2).mean()).item()
                step *= math.sqrt(mse / err) if err > 0 else 1.0
            u_train = torch.round((flat_train - mean) / step).long()
            u_test = torch.round((flat_test - mean) / step).long()

            def deltas(codes, windows):  # per window, per channel, the first token kept as is
                return torch.cat([torch.cat([w[:1], w.diff(dim=0)]) for w in codes.split([len(x) for x in windows])])

            rows[name].append(
                dict(
                    layer=layer,
                    mse=mse,
                    stat_bits=stat_bits,
                    one_table=entropy_bits(c_train.reshape(-1, 1), c_test.reshape(-1, 1)),
                    table_per_channel=entropy_bits(c_train, c_test),
                    deltas_per_channel=entropy_bits(d_train, d_test),
                    uniform_step=step,
                    uniform_per_channel=entropy_bits(u_train, u_test),
                    uniform_deltas_per_channel=entropy_bits(deltas(u_train, train), deltas(u_test, test)),
                )
            )
    summary = {}
    for name, layers in rows.items():

        def avg(key, layers=layers):
            return sum(r[key] for r in layers) / len(layers)

        summary[name] = dict(
            fixed=bits + avg("stat_bits"),
            one_table=avg("one_table") + avg("stat_bits"),
            table_per_channel=avg("table_per_channel") + avg("stat_bits"),
            deltas_per_channel=avg("deltas_per_channel") + avg("stat_bits"),
            uniform_per_channel=avg("uniform_per_channel"),
            uniform_deltas_per_channel=avg("uniform_deltas_per_channel"),
        )
    return dict(bits=bits, summary=summary, layers=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8, help="half make the tables, half pay them")
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    harness = Harness(ensure_default_model(), args.windows, args.context_tokens, 1, 0)
    results = [study(harness, b) for b in args.bits]
    print("bits per element (codes + per-group statistics; ideal coder, tables from other windows)")
    print(
        f"{'tensor':<7}{'quantizer':>10}{'fixed':>8}{'1 table':>9}{'per chan':>9}{'deltas':>8}"
        f"{'uniform EC, same MSE':>22}"
        f"{'its deltas':>11}"
    )
    for result in results:
        for name, s in result["summary"].items():
            print(
                f"{name:<7}{result['bits']:>7}-bit{s['fixed']:>8.3f}{s['one_table']:>9.3f}{s['table_per_channel']:>9.3f}"
                f"{s['deltas_per_channel']:>8.3f}{s['uniform_per_channel']:>22.3f}{s['uniform_deltas_per_channel']:>11.3f}"
            )
    if args.json:
        setup = dict(
            windows=args.windows,
            context_tokens=args.context_tokens,
            group_tokens=GROUP,
            rotation="hadamard",
            value_axis="token",
            model=harness.geometry.model,
        )
        args.json.write_text(json.dumps(dict(setup=setup, results=results), indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

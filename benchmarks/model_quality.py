"""How close a decode's next-token distribution stays to the prefill's own when the KV crosses at
each profile, on a real model served by vLLM (default: Gemma 3 270M, a sliding-window hybrid):

    .venv/bin/python benchmarks/model_quality.py --model gemma3-270m   # writes benchmarks/results/quality_gemma3.json

Instances on the CPU, unpinned, prefix caching on, 256 MiB of KV cache each: a reference prefill
(kv_both, lossless) and one prefill per lossy profile (--profiles; "basis" fits the model's
automatic basis at start-up), a decode (kv_both), our proxy in front of each pair. For
each prompt (--lengths tokens of the CPython language reference, --prompts of each, distinct
texts), the decode's first generated token's top-20 log-probabilities through each profile's pair
against the reference's own from its prefix cache (the cached prompt plus its last token, as a
decode computes it): the mean and largest difference over the tokens both lists hold, and whether
the most likely token is the same. The lossless row is the floor: the same KV, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TOP = 20
KV_CACHE_BYTES = 256 << 20  # each instance's: five with vLLM's 1 GiB default ran this 24 GB machine out of memory


def _top(url: str, model: str, ids: list[int]) -> dict[str, float]:
    from cachegen_vllm.serving.launch import post

    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": TOP}
    return post(f"{url}/v1/completions", body)["choices"][0]["logprobs"]["top_logprobs"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model", default="gemma3-270m", help="a shipped model's name or a checkpoint directory")
    parser.add_argument("--profiles", nargs="+", default=["default", "basis"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 3072])
    parser.add_argument("--prompts", type=int, default=4, help="prompts of each length")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/quality_gemma3.json"))
    parser.add_argument("--logs", type=Path, default=Path("/tmp/cachegen-model-quality"))
    args = parser.parse_args()
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from cachegen_vllm.offline.model import model_path
    from cachegen_vllm.serving.launch import (
        cachegen_counters,
        kv_transfer_config,
        start_instance,
        stop_all,
        wait_healthy,
        warm_up,
    )
    from cachegen_vllm.serving.proxy import create_app
    from cachegen_vllm.testing.asgi import serve
    from cachegen_vllm.testing.ports import free_ports

    model_dir = model_path(args.model)
    model = str(model_dir)
    args.logs.mkdir(parents=True, exist_ok=True)
    ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    names = ["lossless", *args.profiles]
    ports = {name: free_ports() for name in [*names, "decode"]}
    procs, servers = {}, []
    try:
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name in [*names, "decode"]:  # one after another: five starting at once overran vLLM's start-up here
            role = "kv_both" if name in ("lossless", "decode") else "kv_producer"
            extra = {"profile": name} if name != "decode" else {}
            config = kv_transfer_config(role, {**extra, "bind": f"tcp://127.0.0.1:{free_ports()}"})
            procs[name] = start_instance(
                model_dir, ports[name], args.logs / f"{name}.log", config, kv_cache_bytes=KV_CACHE_BYTES
            )
            wait_healthy(urls[name], procs[name], timeout_s=900)
            warm_up(urls[name], model)
        fronts = {}
        for name in names:
            fronts[name], server = serve(create_app([urls[name]], [urls["decode"]]))
            servers.append(server)
            warm_up(fronts[name], model)
        rows = []
        offset = 0
        for length in args.lengths:
            for _ in range(args.prompts):
                prompt, offset = ids[offset : offset + length], offset + length
                _top(urls["lossless"], model, prompt)  # now its prefix cache holds the prompt
                want = _top(urls["lossless"], model, prompt)
                for name in names:
                    before = cachegen_counters(urls["decode"])
                    got = _top(fronts[name], model, prompt)
                    after = cachegen_counters(urls["decode"])
                    shared = want.keys() & got.keys()
                    differences = [abs(got[t] - want[t]) for t in shared]
                    rows.append(
                        {
                            "profile": name,
                            "tokens": length,
                            "shared": len(shared),
                            "mean_abs_logprob_difference": statistics.fmean(differences) if differences else None,
                            "max_abs_logprob_difference": max(differences, default=None),
                            "same_top1": max(want, key=want.__getitem__) == max(got, key=got.__getitem__),
                            "transferred": after.get("transfers", 0) - before.get("transfers", 0),
                            "ratio": (after["raw_bytes"] - before.get("raw_bytes", 0))
                            / max(1.0, after["wire_bytes"] - before.get("wire_bytes", 0)),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for server in servers:
            server.should_exit = True  # type: ignore[attr-defined]
        stop_all(list(procs.values()))
    summary = {}
    for name in names:
        mine = [r for r in rows if r["profile"] == name and r["mean_abs_logprob_difference"] is not None]
        summary[name] = {
            "mean_abs_logprob_difference": statistics.fmean(r["mean_abs_logprob_difference"] for r in mine),
            "max_abs_logprob_difference": max(r["max_abs_logprob_difference"] for r in mine),
            "same_top1": sum(r["same_top1"] for r in mine) / len(mine),
            "ratio": statistics.fmean(r["ratio"] for r in mine),
            "transfers": sum(r["transferred"] for r in mine),
        }
        print(name, json.dumps(summary[name]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": model_dir.name, "top": TOP, "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

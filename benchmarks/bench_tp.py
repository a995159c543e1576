"""Tensor-parallel splits on either side of a transfer, on the embedded model over loopback.

    .venv/bin/python benchmarks/bench_tp.py --json benchmarks/results/tp.json

Three vLLM CPU servers: a TP=3 instance and a TP=1 instance (both raw, kv_both) and a plain
TP=1 reference. For each prompt (English text, 2 KV blocks + 1 token) and each direction (TP=3 ->
TP=1 and TP=1 -> TP=3), the prefill computes it, the decode loads
its KV and answers; reported: the decode's wire bytes, the load's transfer seconds (the decode's
counters), the first token's log-probability against the reference's, and how much of a 32-token
greedy answer matches the reference's. The prefill instance's own answer from its cache (no
transfer) is there to tell TP's rounding from the transfer's: the KV of a TP=3 engine differs from
a TP=1 engine's in the last bits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    post,
    start_instance,
    stop_all,
    wait_healthy,
    warm_up,
)
from cachegen_vllm.testing.ports import free_ports
from cachegen_vllm.testing.prompts import common_prefix, document_prompt

PROMPTS = 4
KV_CACHE_BYTES = 256 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, default=Path.home() / ".cache/cachegen-vllm/bench-tp-logs")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    model = ensure_default_model()
    base = free_ports(7)  # three HTTP ports, then the producers': three for TP=3's ranks, one for TP=1's
    ports = {"tp3": base, "tp1": base + 1, "reference": base + 2}
    binds = {"tp3": base + 3, "tp1": base + 6}
    procs = {
        name: start_instance(
            model,
            ports[name],
            args.logs / f"{name}.log",
            kv_transfer_config("kv_both", {"profile": "raw", "bind": f"tcp://127.0.0.1:{binds[name]}"})
            if name != "reference"
            else None,
            # unpinned: pinned "0|1|0" on two cores, two ranks spin on one core (docs/JOURNAL.md)
            extra_args=("--tensor-parallel-size", "3") if name == "tp3" else (),
            kv_cache_bytes=KV_CACHE_BYTES,
        )
        for name in ("tp3", "tp1", "reference")
    }
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    name_of_model = str(model)

    def answer(url: str, text, params=None, max_tokens: int = 32) -> dict:
        body = {"model": name_of_model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
        if params is not None:
            body["kv_transfer_params"] = params
        choice = post(f"{url}/v1/completions", body)["choices"][0]
        return {"text": choice["text"], "logprob": choice["logprobs"]["token_logprobs"][0]}

    rows = []
    try:
        for name, proc in procs.items():
            wait_healthy(urls[name], proc, timeout_s=600)
            warm_up(urls[name], name_of_model)
        index = 0
        for direction in (("tp3", "tp1"), ("tp1", "tp3")):
            for _ in range(PROMPTS):
                index += 1
                text = document_prompt(index, 2 * 128 + 1)
                prefill, decode = direction
                answer(urls["reference"], text, max_tokens=1)  # its prefix cache: a decode's computation
                expected = answer(urls["reference"], text)
                params = post(
                    f"{urls[prefill]}/v1/completions",
                    {
                        "model": name_of_model,
                        "prompt": text,
                        "max_tokens": 1,
                        "kv_transfer_params": {"do_remote_decode": True},
                    },
                )["kv_transfer_params"]
                before = cachegen_counters(urls[decode])
                got = answer(urls[decode], text, params)
                after = cachegen_counters(urls[decode])
                own = answer(urls[prefill], text)  # the prefill instance's own answer, no transfer
                rows.append(
                    {
                        "direction": f"TP={3 if prefill == 'tp3' else 1} -> TP={3 if decode == 'tp3' else 1}",
                        "tokens": len(text),
                        "wire_bytes": after.get("wire_bytes", 0) - before.get("wire_bytes", 0),
                        "transfer_seconds": after.get("transfer_seconds", 0) - before.get("transfer_seconds", 0),
                        "failures": after.get("failures", 0) - before.get("failures", 0),
                        "logprob_delta": abs(got["logprob"] - expected["logprob"]),
                        "match": common_prefix(got["text"], expected["text"]),
                        "prefill_alone_match": common_prefix(own["text"], expected["text"]),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_all(list(procs.values()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

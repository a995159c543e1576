"""The main job: a local prefill instance, decode instance and proxy on the embedded model, real
requests through the OpenAI client, and what crossed between the instances.

    cachegen-vllm demo [--profile default] [--requests 3]

Everything started here is stopped on exit, Ctrl-C included. `start_instance` and `stop_all` are
also what the end-to-end tests and benchmarks use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

WARMUP_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)


def _cores(role: str) -> str:
    """Split the machine's cores between the two instances. Each instance is pinned whole
    (taskset), not only its compute threads: a decode waiting for KV steps its engine
    continuously, and would otherwise take the core the prefill computes on."""
    n = os.cpu_count() or 1
    if n == 1:
        return "0"
    half = n // 2
    return f"0-{half - 1}" if role == "kv_producer" else f"{half}-{n - 1}"


def kv_transfer_config(role: str, extra: dict, policy: str = "recompute") -> dict:
    config = {"kv_connector": "CacheGenConnector", "kv_role": role, "kv_connector_extra_config": extra}
    if role == "kv_consumer":
        config["kv_load_failure_policy"] = policy
    return config


def start_instance(model: Path, port: int, log_path: Path, transfer: dict | None = None,
                   launcher: list[str] | None = None, cores: str = "nobind", extra_args: tuple[str, ...] = (),
                   host: str = "127.0.0.1") -> subprocess.Popen:
    """A vLLM OpenAI server, with the CacheGenConnector if ``transfer`` (a kv_transfer_config)
    is given; ``launcher`` prefixes the command (e.g. ``ip netns exec NS``, ``taskset -c 0``);
    ``cores`` binds vLLM's compute threads; ``extra_args`` go to vLLM."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), VLLM_CPU_OMP_THREADS_BIND=cores)
    argv = [*(launcher or []), sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--host", host, "--port", str(port), "--enforce-eager", "--max-model-len", "4096"]
    if transfer is not None:
        argv += ["--kv-transfer-config", json.dumps(transfer)]
    argv += extra_args
    log = open(log_path, "w")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode} before it was ready (see its log)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def post(url: str, body: dict, timeout_s: float = 300) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        return json.loads(r.read())


def warm_up(url: str, model: str) -> None:
    """One request of 20+ tokens first: with bf16 on AMX CPUs, a worker whose first forward pass has
    only 1-2 query tokens dies with SIGILL in cpu_attention_with_kv_cache (vLLM 0.32, with or
    without a connector), which is what a decode instance's first pass after a remote hit is."""
    post(f"{url}/v1/completions", {"model": model, "prompt": WARMUP_PROMPT, "max_tokens": 2})


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def cachegen_counters(url: str) -> dict[str, float]:
    """The connector's counters from a vLLM instance's /metrics; failures also by kind, as
    ``failed_<kind>``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^vllm:cachegen_(\w+?)_total\{([^}]*)\} (\S+)$", text, re.M):
        kind = re.search(r'kind="(\w+)"', labels)
        for key in (name, *([f"failed_{kind[1]}"] if kind else [])):
            out[key] = out.get(key, 0.0) + float(value)
    return out


def questions() -> list[tuple[str, str]]:
    """(context, question) pairs over the CPython language reference."""
    from pydoc_data.topics import topics

    return [
        (topics["for"], "What happens to the loop variable after a for loop ends?"),
        (topics["with"], "What does the with statement guarantee about __exit__?"),
        (topics["class"], "How is a class body executed?"),
        (topics["try"], "When does the finally clause run?"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cachegen-vllm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="compression profile (name or .toml)")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--logs", type=Path, default=Path("results/demo-logs"))
    args = parser.parse_args(argv)
    from openai import OpenAI

    from cachegen_vllm.model import ensure_default_model

    model = ensure_default_model()
    args.logs.mkdir(parents=True, exist_ok=True)
    prefill_url, decode_url, proxy_url = "http://127.0.0.1:8100", "http://127.0.0.1:8200", "http://127.0.0.1:8000"
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"starting prefill and decode instances (logs in {args.logs}/), about a minute", flush=True)
        producer = kv_transfer_config("kv_producer", {"profile": args.profile, "bind": "tcp://127.0.0.1:5601"})
        for role, port, transfer in (("kv_producer", 8100, producer), ("kv_consumer", 8200, kv_transfer_config("kv_consumer", {}))):
            cores = _cores(role)
            procs.append(start_instance(model, port, args.logs / f"{'prefill' if role == 'kv_producer' else 'decode'}.log", transfer,
                                        launcher=["taskset", "-c", cores], cores=cores))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cachegen_vllm.cli", "proxy", "--prefill", prefill_url, "--decode", decode_url, "--port", "8000"],
            stdout=open(args.logs / "proxy.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,  # noqa: SIM115
        ))
        for url, proc in ((prefill_url, procs[0]), (decode_url, procs[1]), (proxy_url, procs[2])):
            wait_healthy(url, proc)
        for url in (prefill_url, decode_url):
            warm_up(url, str(model))
        client = OpenAI(base_url=f"{proxy_url}/v1", api_key="none")
        before = cachegen_counters(decode_url)
        for context, question in questions()[: args.requests]:
            started, first, text = time.perf_counter(), None, []
            stream = client.chat.completions.create(
                model=str(model), temperature=0, max_tokens=args.max_tokens, stream=True,
                messages=[{"role": "system", "content": "Answer from this text.\n\n" + context},
                          {"role": "user", "content": question}],
            )
            for event in stream:
                if event.choices and event.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(event.choices[0].delta.content)
            answer = " ".join("".join(text).split())
            print(f"\nQ: {question}\nA: {answer[:300]}\n   TTFT {1000 * (first - started):.0f} ms through the proxy", flush=True)
        after = cachegen_counters(decode_url)
        raw = after.get("raw_bytes", 0) - before.get("raw_bytes", 0)
        wire = after.get("wire_bytes", 0) - before.get("wire_bytes", 0)
        failures = after.get("failures", 0) - before.get("failures", 0)
        print(f"\nKV received by the decode instance: {raw / 2**20:.2f} MiB raw (bf16), {wire / 2**20:.2f} MiB on the wire, "
              f"ratio {raw / wire if wire else float('nan'):.2f}x (profile {args.profile}); failed transfers: {failures:.0f}")
    finally:
        stop_all(procs)

"""A tensor-parallel prefill sharing its cores with a decode, as a two-core machine runs them: do
the transfers go through?

    .venv/bin/python benchmarks/bench_pinned_tp.py --runs 2 --requests 3 --json benchmarks/results/pinned_tp.json

Per run, a TP=3 prefill pinned ``0|1|0`` (VLLM_CPU_OMP_THREADS_BIND, profile default), a TP=1 decode
whose compute is bound to core 1 (the same core as the prefill's rank 1), both started as vLLM
servers in sessions of their own, and vLLM's P/D router in front; then --requests requests of
1,000 tokens of English text, one at a time. Reported per request: seconds through the router,
whether the KV came over (the decode's transfers counter) or the request recomputed after a
failure (the decode's failures by kind), and the CPU time the decode's worker took per second of
the request. With the kernel's per-session group scheduling (``/proc/sys/kernel/sched_autogroup_enabled``,
recorded), a decode that steps without pause while it waits for KV took core 1 whole, and rank 1
of the prefill, on that core, got no CPU for 10 s: its transfer stalled (docs/JOURNAL.md, stop 17).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    post,
    start_instance,
    start_router,
    stop_all,
    wait_healthy,
    warm_up,
)
from cachegen_vllm.testing.ports import free_ports
from cachegen_vllm.testing.prompts import document_prompt

KV_CACHE_BYTES = 256 << 20
TOKENS = 1000


def worker_cpu_seconds(session: int) -> float:
    """CPU seconds so far of the decode's worker processes (comm ``VLLM::Worker*``) in a session."""
    total = 0.0
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and comm.startswith("VLLM::Worker"):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run(index: int, requests: int, logs: Path) -> list[dict]:
    model = ensure_default_model()
    base = free_ports(7)
    ports = {"prefill": base, "decode": base + 1, "router": base + 2, "router-metrics": base + 3}
    procs = {
        "prefill": start_instance(
            model,
            ports["prefill"],
            logs / f"prefill-{index}.log",
            kv_transfer_config("kv_producer", {"profile": "default", "bind": f"tcp://127.0.0.1:{base + 4}"}),
            cores="0|1|0",
            extra_args=("--tensor-parallel-size", "3"),
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
        "decode": start_instance(
            model,
            ports["decode"],
            logs / f"decode-{index}.log",
            kv_transfer_config("kv_consumer", {"load_timeout_s": 60}),
            cores="1",
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
    }
    urls = {name: f"http://127.0.0.1:{ports[name]}" for name in ("prefill", "decode", "router")}
    rows = []
    try:
        for name in ("prefill", "decode"):
            wait_healthy(urls[name], procs[name], timeout_s=600)
            warm_up(urls[name], str(model))
        procs["router"] = start_router(
            [urls["prefill"]], [urls["decode"]], ports["router"], ports["router-metrics"], logs / f"router-{index}.log"
        )
        wait_healthy(urls["router"], procs["router"], timeout_s=60)
        for i in range(requests):
            before, cpu_before = cachegen_counters(urls["decode"]), worker_cpu_seconds(procs["decode"].pid)
            started = time.monotonic()
            body = {"model": str(model), "prompt": document_prompt(i, TOKENS), "max_tokens": 4, "temperature": 0}
            post(f"{urls['router']}/v1/completions", body)
            seconds = time.monotonic() - started
            after, cpu_after = cachegen_counters(urls["decode"]), worker_cpu_seconds(procs["decode"].pid)
            failures = {k: after[k] - before.get(k, 0) for k in after if k.startswith("failed_")}
            rows.append(
                {
                    "run": index,
                    "request": i,
                    "seconds": round(seconds, 2),
                    "transferred": after.get("transfers", 0) - before.get("transfers", 0) == 1,
                    "failures": {k: v for k, v in failures.items() if v},
                    "decode_worker_cpu_share": round((cpu_after - cpu_before) / seconds, 2),
                }
            )
            print(rows[-1], flush=True)
    finally:
        stop_all(list(procs.values()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, default=Path.home() / ".cache/cachegen-vllm/bench-pinned-tp-logs")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    rows = [row for index in range(args.runs) for row in run(index, args.requests, args.logs)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    setup = {
        "commit": commit,
        "autogroup": Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip(),
        "tokens": TOKENS,
        "prefill": "TP=3, VLLM_CPU_OMP_THREADS_BIND=0|1|0, profile default",
        "decode": "TP=1, VLLM_CPU_OMP_THREADS_BIND=1",
    }
    transferred = sum(r["transferred"] for r in rows)
    print(f"{transferred} of {len(rows)} requests had their KV transferred")
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""TTFT, end-to-end latency and throughput under load of disaggregated prefill/decode, with the
prefill and decode instances in two network namespaces joined by a shaped veth link (root needed).

    .venv/bin/pip install -e '.[bench]'   # matplotlib; nixl and vllm-router for vLLM's NixlConnector
    .venv/bin/python benchmarks/bench_e2e.py --json benchmarks/results/e2e.json --plot benchmarks/results/e2e.png

Per link rate (--rates) and prompt length (--lengths; 1K, 2K, 3K tokens of English text), the
median over --reps of one request at a time in each mode (--modes):
  prefill    the prefill instance alone computing the prompt (max_tokens=1, nothing sent): the part
             of P/D TTFT that is not transfer;
  recompute  the decode instance computing the prompt itself, no transfer (its TTFT);
  nixl       vLLM's own NixlConnector (UCX over TCP, exact bf16 KV) behind vLLM's P/D router
             (vllm-router): the anchor;
  raw, default, smollm2-basis, adaptive
             P/D with the CacheGenConnector and that profile ("adaptive": the ladder raw,
             high-quality, default, smollm2-basis) behind our proxy, overlapped (the proxy's
             default: both legs at once, the transfer overlapping the prefill's compute).
Then, per link rate, --concurrency requests at once of distinct 2K-token prompts in each mode but
`prefill`: output tokens/s over the batch and TTFT p50/p99 (rows with "load": N).
Per row: TTFT and end-to-end latency; for P/D modes the transfer (network) time and the decode
(codec) time per request, from the decode instance's /metrics (CacheGen: its counters; nixl: the
sum of vllm:nixl_xfer_time_seconds, and no codec, so decode_s is null), and the ratio raw bytes /
wire bytes (nixl: 1.0, its KV crosses as it is). The overhead of a P/D mode is its TTFT less
`prefill`. Prefix caching is off, so every repetition computes everything.

Two phases, each starting its servers once and changing only the link's shaping between rates (tc
qdisc replace): every mode but nixl, then nixl. Apart because NIXL's progress thread polls without
pause: an idle NixlConnector instance takes a whole core, the other modes' core. Within the nixl
phase the prefill's pollers run SCHED_IDLE (--nixl-pollers prefill-idle): its compute keeps its
core, and the decode's reads come after it, when the core is free. The decode's poller shares core
1 with the decode's steps (seen at 100mbit, 1K tokens: transfer at link speed, tokens after the
first ~2x slower); SCHED_IDLE there too (idle) starves the transfer instead (2.0 -> 3.0-3.7 s). The
proxy, the router and the client sit in the
decode's namespace; the prefill's HTTP answers and its KV cross the shaped link. Each instance,
every thread of it, is pinned to one core: the prefill instances to core 0, the decode instances to
core 1 (a decode waiting for KV steps its engine continuously, and unpinned it steals the prefill's
core).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LENGTHS = (1024, 2048, 3072)
LOAD_TOKENS = 2048
MAX_TOKENS = 32
RATES = ("50mbit", "100mbit", "200mbit", "1000mbit")
CACHEGEN = {  # mode -> the prefill's kv_connector_extra_config (its "bind" added)
    "raw": {"profile": "raw"},
    "default": {"profile": "default"},
    "smollm2-basis": {"profile": "smollm2-basis"},
    "adaptive": {"profile": "adaptive", "ladder": ["raw", "high-quality", "default", "smollm2-basis"]},
    "default-nohma": {"profile": "default"},
}
# modes whose instances run with vLLM's hybrid KV cache manager off (as vLLM ran a connector that
# is not SupportsHMA): a sliding-window model's layers then keep, and send, every token
NO_HMA = {"default-nohma": ("--disable-hybrid-kv-cache-manager",)}
PD_MODES = ("nixl", *CACHEGEN)
MODES = ("prefill", "recompute", *PD_MODES)
NIXL_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
# near namespace (prefill side): HTTP 8111.., CacheGen KV 5611.., NIXL side channel 5700
# far namespace (decode side): decode 8200, nixl decode 8201 (side channel 5701), proxies 8301..,
# router 8400 (its Prometheus port 8401)
PREFILL_PORTS = {mode: 8111 + i for i, mode in enumerate(PD_MODES)}
KV_PORTS = {mode: 5611 + i for i, mode in enumerate(CACHEGEN)}
PROXY_PORTS = {mode: 8301 + i for i, mode in enumerate(CACHEGEN)}
NIXL_SIDE_PORTS = {"near": 5700, "far": 5701}
DECODE_PORT, NIXL_DECODE_PORT, ADAPTIVE_DECODE_PORT, ROUTER_PORT, ROUTER_METRICS_PORT = 8200, 8201, 8202, 8400, 8401
NO_HMA_DECODE_PORT = 8203
# the decode's own prefill rate on its one core, for the adaptive mode's recompute fallback: the
# recompute rows run 360-575 tokens/s (benchmarks/results/e2e.json), fewer for longer prompts
RECOMPUTE_TOKENS_PER_S = 500
KV_CACHE_BYTES = 256 << 20  # per instance: 11K tokens (SmolLM2-135M: 22.5 KiB/token), a load batch fits


def require_bench_extra(need_nixl: bool) -> None:
    """Fail now, not mid-run, where the bench extra is missing."""
    for module in ("matplotlib", *(["nixl._api", "vllm_router"] if need_nixl else [])):
        try:
            importlib.import_module(module)
        except Exception as e:  # nixl's import can fail in other ways than ImportError
            sys.exit(f"bench_e2e needs {module.split('.')[0]} ({e}): run pip install -e '.[bench]'")


def token_text(model: str) -> list[int]:
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids


def stream(url: str, body: dict) -> tuple[float, float, int]:
    """(time to first token, time to the last, output tokens) of a streamed completion."""
    import httpx

    started, first, chunks, usage = time.perf_counter(), None, 0, None
    body = dict(body, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", url, json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                chunks += 1
    if first is None:
        raise RuntimeError(f"{url}: no token came back")
    return first - started, time.perf_counter() - started, usage if usage is not None else chunks


def metrics(url: str) -> dict[str, float]:
    """The transfer counters of a decode instance: CacheGen's (`cachegen_counters`) and the
    NixlConnector's histograms' sums and counts (``nixl_xfer_time_seconds_sum``, ...)."""
    import re
    import urllib.request

    from cachegen_vllm.serving.launch import cachegen_counters

    out = cachegen_counters(url)
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for name, value in re.findall(r"^vllm:(nixl_\w+?)(?:\{[^}]*\})? (\S+)$", text, re.M):
        if not name.endswith(("_bucket", "_created")):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def transfer_stats(mode: str, readings: list[tuple[dict, dict]], requests: int) -> dict:
    """Per-request transfer figures of ``mode`` over pairs of `metrics` readings taken just before
    and after its requests (one decode serves every CacheGen mode: only those intervals are its)."""
    d: dict[str, float] = {}
    for before, after in readings:
        for k in after:
            d[k] = d.get(k, 0.0) + after[k] - before.get(k, 0.0)
    if mode == "nixl":
        wire = d.get("nixl_bytes_transferred_sum", 0.0) / requests
        failures = sum(d.get(k, 0.0) for k in ("nixl_num_failed_transfers_total", "nixl_num_kv_expired_reqs_total"))
        return {
            "transfer_s": d.get("nixl_xfer_time_seconds_sum", 0.0) / requests,
            "decode_s": None,  # no codec: the KV lands in the decode's cache as it is
            "wire_bytes": wire,
            "raw_bytes": wire,
            "ratio": 1.0,
            "failures": failures,
            "transfers": d.get("nixl_xfer_time_seconds_count", 0.0),
        }
    wire, raw = d.get("wire_bytes", 0.0) / requests, d.get("raw_bytes", 0.0) / requests
    return {
        "transfer_s": d.get("transfer_seconds", 0.0) / requests,
        "decode_s": d.get("decode_seconds", 0.0) / requests,
        "wire_bytes": wire,
        "raw_bytes": raw,
        "ratio": raw / wire if wire else None,
        "failures": d.get("failures", 0.0),
        "transfers": d.get("transfers", 0.0),
        "declined": d.get("declined", 0.0),  # recomputed by the decode: the link was slower
    }


def levels(urls: dict, mode: str) -> dict[str, float]:
    """Layers the adaptive prefill has coded at each level so far (nothing for the other modes)."""
    from cachegen_vllm.serving.launch import cachegen_counters

    if mode != "adaptive":
        return {}
    counters = cachegen_counters(urls["prefill-adaptive"])
    return {k[len("level_") :]: v for k, v in counters.items() if k.startswith("level_")}


def estimates(prefill_url: str) -> dict[str, float]:
    """The adaptive prefill's rate estimates now (its gauges): what its last choices were made from."""
    from cachegen_vllm.serving.launch import vllm_metric

    names = ("link_bytes_per_second", "production_bytes_per_second", "kv_tokens_per_second")
    return {name: vllm_metric(prefill_url, f"cachegen_{name}") for name in names}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def start_servers(
    model: Path,
    near_ns: str,
    near_ip: str,
    far_ip: str,
    modes: list[str],
    logs: Path,
    procs: dict,
    recompute_tokens_per_s: float,
) -> dict:
    """Every instance the modes need, the proxies and the router, into ``procs``; their URLs by name."""
    from cachegen_vllm.serving.launch import kv_transfer_config, start_instance, start_router

    no_prefix = ("--no-enable-prefix-caching",)
    common = {"extra_args": no_prefix, "kv_cache_bytes": KV_CACHE_BYTES}
    near = ["ip", "netns", "exec", near_ns, "taskset", "-c", "0"]
    far = ["taskset", "-c", "1"]

    def nixl_env(ip: str, side: str) -> list[str]:  # UCX over TCP: the network, not shared memory
        port = NIXL_SIDE_PORTS[side]
        return ["env", "UCX_TLS=tcp", f"VLLM_NIXL_SIDE_CHANNEL_HOST={ip}", f"VLLM_NIXL_SIDE_CHANNEL_PORT={port}"]

    urls: dict = {}
    for mode in (m for m in PD_MODES if m in modes):
        if mode == "nixl":
            config, launcher = NIXL_CONFIG, near[:4] + nixl_env(near_ip, "near") + near[4:]
        else:
            extra = dict(CACHEGEN[mode], bind=f"tcp://{near_ip}:{KV_PORTS[mode]}")
            config, launcher = kv_transfer_config("kv_producer", extra), near
        procs[f"prefill-{mode}"] = start_instance(
            model,
            PREFILL_PORTS[mode],
            logs / f"prefill-{mode}.log",
            config,
            launcher,
            "0",
            host="0.0.0.0",
            **dict(common, extra_args=no_prefix + NO_HMA.get(mode, ())),
        )
        urls[f"prefill-{mode}"] = f"http://{near_ip}:{PREFILL_PORTS[mode]}"
    if "prefill" in modes and not procs:  # a plain instance where no P/D mode has one
        procs["prefill-plain"] = start_instance(
            model, PREFILL_PORTS["raw"], logs / "prefill-plain.log", None, near, "0", host="0.0.0.0", **common
        )
        urls["prefill-plain"] = f"http://{near_ip}:{PREFILL_PORTS['raw']}"
    if "recompute" in modes or any(m in modes for m in CACHEGEN):
        config = kv_transfer_config("kv_consumer", {})
        procs["decode"] = start_instance(model, DECODE_PORT, logs / "decode.log", config, far, "1", **common)
        urls["decode"] = f"http://127.0.0.1:{DECODE_PORT}"
    if "adaptive" in modes:  # its own decode: the only one that recomputes where the link is slower
        config = kv_transfer_config("kv_consumer", {"recompute_tokens_per_s": recompute_tokens_per_s})
        procs["decode-adaptive"] = start_instance(
            model, ADAPTIVE_DECODE_PORT, logs / "decode-adaptive.log", config, far, "1", **common
        )
        urls["decode-adaptive"] = f"http://127.0.0.1:{ADAPTIVE_DECODE_PORT}"
    for mode in (m for m in NO_HMA if m in modes):  # its decode keeps every token of every layer too
        procs[f"decode-{mode}"] = start_instance(
            model,
            NO_HMA_DECODE_PORT,
            logs / f"decode-{mode}.log",
            kv_transfer_config("kv_consumer", {}),
            far,
            "1",
            **dict(common, extra_args=no_prefix + NO_HMA[mode]),
        )
        urls[f"decode-{mode}"] = f"http://127.0.0.1:{NO_HMA_DECODE_PORT}"
    if "nixl" in modes:
        launcher = nixl_env(far_ip, "far") + far
        procs["decode-nixl"] = start_instance(
            model, NIXL_DECODE_PORT, logs / "decode-nixl.log", NIXL_CONFIG, launcher, "1", **common
        )
        urls["decode-nixl"] = f"http://127.0.0.1:{NIXL_DECODE_PORT}"
        procs["front-nixl"] = start_router(
            [urls["prefill-nixl"]], [urls["decode-nixl"]], ROUTER_PORT, ROUTER_METRICS_PORT, logs / "router.log"
        )
        urls["front-nixl"] = f"http://127.0.0.1:{ROUTER_PORT}"
    for mode in (m for m in CACHEGEN if m in modes):
        argv = [sys.executable, "-m", "cachegen_vllm.serving.cli", "proxy", "--prefill", urls[f"prefill-{mode}"]]
        argv += [
            "--decode",
            urls[decode_name(mode)],
            "--port",
            str(PROXY_PORTS[mode]),
        ]
        log = open(logs / f"proxy-{mode}.log", "w")  # noqa: SIM115 (the child owns it)
        procs[f"front-{mode}"] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        urls[f"front-{mode}"] = f"http://127.0.0.1:{PROXY_PORTS[mode]}"
    return urls


def decode_name(mode: str) -> str:
    """The decode instance a P/D mode's transfers go to."""
    return "decode-nixl" if mode == "nixl" else f"decode-{mode}" if mode == "adaptive" or mode in NO_HMA else "decode"


def session_threads(sid: int) -> list[str]:
    """/proc/PID/task/TID of every thread of every process in session ``sid`` (an instance and all
    it started)."""
    tasks = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    tasks += [f"/proc/{pid}/task/{tid}" for tid in os.listdir(f"/proc/{pid}/task")]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return tasks


def pin(procs: dict) -> None:
    """Every thread of every instance onto its side's core again: seen, a NixlConnector prefill's
    worker whose main thread (the one computing) had moved itself to core 1."""
    for name, proc in procs.items():
        if name.startswith(("prefill-", "decode")):
            for task in session_threads(proc.pid):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.rsplit("/", 1)[1]), {0 if name.startswith("prefill-") else 1})


def demote_pollers(procs: dict) -> list[int]:
    """NIXL's progress thread polls without pause (nixl._api sets pthrDelay 0): idle, it takes
    its whole core. Its threads that burn more than half a core while idle run SCHED_IDLE from
    here on: they get the core whenever the instance's compute does not need it."""

    def cpu_ticks() -> dict[int, int]:
        out = {}
        for proc in procs.values():
            for task in session_threads(proc.pid):
                with contextlib.suppress(OSError, IndexError), open(f"{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                    out[int(task.rsplit("/", 1)[1])] = int(fields[11]) + int(fields[12])  # utime + stime
        return out

    before = cpu_ticks()
    time.sleep(2)
    after = cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = [tid for tid, t in after.items() if tid in before and (t - before[tid]) / hz > 1.0]
    for tid in busy:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    return busy


def measure(spec: dict, link, modes: list[str], rows: list[dict], log: dict) -> None:
    """Starts the instances ``modes`` need, measures at every rate (reshaping the link in between),
    stops them; appends to ``rows``."""
    from cachegen_vllm.serving.launch import post, stop_all, wait_healthy, warm_up

    logs, reps, concurrency, lengths = Path(spec["logs"]), spec["reps"], spec["concurrency"], spec["lengths"]
    model = spec["model"]
    procs: dict = {}
    started = time.perf_counter()
    try:
        urls = start_servers(
            Path(model), link.near, link.near_ip, link.far_ip, modes, logs, procs, spec["recompute_tokens_per_s"]
        )
        for name, proc in procs.items():
            wait_healthy(urls[name], proc, timeout_s=900)
        for name in urls:  # the instances first: a decode's first pass must not be a 1-token one
            if not name.startswith("front-"):
                warm_up(urls[name], model)
        for name in urls:  # a proxy learns its prefill's KV endpoint, NIXL does its handshake
            if name.startswith("front-"):
                warm_up(urls[name], model)
        pin(procs)
        if "nixl" in modes and spec["nixl_pollers"] != "share":
            sides = ("prefill-", "decode") if spec["nixl_pollers"] == "idle" else ("prefill-",)
            demoted = demote_pollers({n: p for n, p in procs.items() if n.startswith(sides)})
            print(f"NIXL pollers set SCHED_IDLE: threads {demoted}", flush=True)
        log["startup_s"].append(time.perf_counter() - started)
        print(f"{', '.join(modes)}: servers up in {log['startup_s'][-1]:.0f} s", flush=True)
        prefill_url = urls.get("prefill-default") or next(u for n, u in urls.items() if n.startswith("prefill-"))
        decode_of = {m: urls[decode_name(m)] for m in PD_MODES if m in modes}
        ids = token_text(model)
        texts = {n: ids[n : 2 * n] for n in lengths}  # distinct texts per length
        load_base = 2 * max(lengths)
        for rate in spec["rates"]:
            link = link.set_rate(rate)
            pin(procs)
            rate_started = time.perf_counter()
            for tokens in lengths:
                body = {"model": model, "prompt": texts[tokens], "max_tokens": MAX_TOKENS, "temperature": 0}
                samples: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
                before_after: dict[str, list[tuple[dict, dict]]] = {m: [] for m in decode_of}
                chose: dict[str, dict[str, float]] = {}  # the adaptive prefill's levels, last repetition
                for _ in range(reps):
                    for mode in modes:
                        if mode == "prefill":
                            t0 = time.perf_counter()
                            post(f"{prefill_url}/v1/completions", dict(body, max_tokens=1))
                            samples[mode].append((time.perf_counter() - t0,) * 2)
                        elif mode == "recompute":
                            samples[mode].append(stream(f"{urls['decode']}/v1/completions", body)[:2])
                        else:
                            before = metrics(decode_of[mode])
                            chosen = levels(urls, mode)
                            samples[mode].append(stream(f"{urls[f'front-{mode}']}/v1/completions", body)[:2])
                            before_after[mode].append((before, metrics(decode_of[mode])))
                            chose[mode] = {k: v - chosen.get(k, 0) for k, v in levels(urls, mode).items()}
                for mode in modes:
                    row = {
                        "rate": rate,
                        "delay_ms_applied": link.delay_ms,
                        "prompt_tokens": tokens,
                        "mode": mode,
                        "ttft_s": statistics.median(t for t, _ in samples[mode]),
                        "e2e_s": statistics.median(e for _, e in samples[mode]),
                        "samples": samples[mode],
                    }
                    if mode in before_after:  # the sum over the repetitions, per request
                        row.update(transfer_stats(mode, before_after[mode], reps))
                    if mode == "adaptive":
                        row.update(levels=chose[mode], **estimates(urls["prefill-adaptive"]))
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
            for mode in (m for m in modes if m != "prefill" and concurrency):
                offset = load_base + MODES.index(mode) * concurrency * LOAD_TOKENS  # distinct prompts per batch
                bodies = [
                    {
                        "model": model,
                        "prompt": ids[offset + j * LOAD_TOKENS : offset + (j + 1) * LOAD_TOKENS],
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                        "ignore_eos": True,
                    }
                    for j in range(concurrency)
                ]
                url = urls["decode"] if mode == "recompute" else urls[f"front-{mode}"]
                before = metrics(decode_of[mode]) if mode in decode_of else {}
                t0 = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    results = list(pool.map(stream, [f"{url}/v1/completions"] * concurrency, bodies))
                wall = time.perf_counter() - t0
                ttfts = [r[0] for r in results]
                row = {
                    "rate": rate,
                    "delay_ms_applied": link.delay_ms,
                    "prompt_tokens": LOAD_TOKENS,
                    "mode": mode,
                    "load": concurrency,
                    "ttft_p50_s": percentile(ttfts, 0.5),
                    "ttft_p99_s": percentile(ttfts, 0.99),
                    "e2e_s": wall,
                    "output_tokens": sum(r[2] for r in results),
                    "tokens_per_s": sum(r[2] for r in results) / wall,
                    "samples": [r[:2] for r in results],
                }
                if mode in decode_of:
                    row.update(transfer_stats(mode, [(before, metrics(decode_of[mode]))], concurrency))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
            log["measure_s"].append(time.perf_counter() - rate_started)
            print(f"{', '.join(modes)} at {rate}: measured in {log['measure_s'][-1]:.0f} s", flush=True)
            Path(spec["out"]).write_text(json.dumps({**log, "rows": rows}))
    finally:
        stop_all(list(procs.values()))


def inside(spec: dict) -> None:
    """Runs in the decode's namespace. Two phases, each with its own servers started once: every
    mode but nixl, then nixl (its idle instances' pollers would take the other modes' cores)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from cachegen_vllm.testing.netns import Link

    link = Link(**spec["link"])
    rows: list[dict] = []
    log: dict = {"startup_s": [], "measure_s": []}
    for phase in ([m for m in spec["modes"] if m != "nixl"], [m for m in spec["modes"] if m == "nixl"]):
        if phase:
            measure(spec, link, phase, rows, log)


LABELS = {
    "prefill": ("prefill alone (no transfer)", "k.:"),
    "recompute": ("decode recomputes", "C1x--"),
    "nixl": ("NixlConnector (vllm-router)", "C2^-"),
    "raw": ("CacheGen raw bf16", "C3o-"),
    "default": ("CacheGen default", "C0s-"),
    "smollm2-basis": ("CacheGen smollm2-basis", "C4D-"),
    "adaptive": ("CacheGen adaptive", "C5v-"),
    "default-nohma": ("CacheGen default, hybrid manager off", "C6P-"),
}


def rate_key(rate: str) -> float:
    for unit, scale in (("kbit", 1e3), ("mbit", 1e6), ("gbit", 1e9)):
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    return float("inf")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in rows if not r.get("load")]
    rates = sorted({r["rate"] for r in single}, key=rate_key)
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), sharey=True, squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for mode in dict.fromkeys(r["mode"] for r in single):
            pts = sorted((r["prompt_tokens"], r["ttft_s"]) for r in single if r["rate"] == rate and r["mode"] == mode)
            label, style = LABELS.get(mode, (mode, "-"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"link {rate}")
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TTFT (s), median")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M on vLLM CPU,\nprefill and decode in two namespaces over a shaped veth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _f(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_table(rows: list[dict], reps: int) -> None:
    single = [r for r in rows if not r.get("load")]
    prefill = {(r["rate"], r["prompt_tokens"]): r["ttft_s"] for r in single if r["mode"] == "prefill"}
    print(
        f"\nOne request at a time, median of {reps}; ovh = TTFT - prefill; xfer, dec: per request, from the "
        "decode's /metrics (nixl: no codec); ratio = raw bytes / wire bytes"
    )
    print(
        f"{'link':<9}{'tokens':>7} {'mode':<14}{'TTFT':>7}{'e2e':>7}{'ovh':>7}{'xfer':>7}{'dec':>7}"
        f"{'wire MB':>9}{'ratio':>7}{'fail':>5}  adaptive: layers per level (last request), declined"
    )
    for r in single:
        base = prefill.get((r["rate"], r["prompt_tokens"]))
        ovh = None if base is None or r["mode"] == "prefill" else r["ttft_s"] - base
        wire = r.get("wire_bytes")
        print(
            f"{r['rate']:<9}{r['prompt_tokens']:>7} {r['mode']:<14}{r['ttft_s']:>7.2f}{r['e2e_s']:>7.2f}"
            f"{_f(ovh, '.2f', 7)}{_f(r.get('transfer_s'), '.2f', 7)}{_f(r.get('decode_s'), '.2f', 7)}"
            f"{_f(None if wire is None else wire / 1e6, '.1f', 9)}{_f(r.get('ratio'), '.2f', 7)}"
            f"{_f(r.get('failures'), '.0f', 5)}"
            + ("  " + " ".join(f"{k}:{v:.0f}" for k, v in r["levels"].items() if v) if r.get("levels") else "")
            + (f"  declined {r['declined']:.0f}" if r.get("declined") else "")
        )
    load = [r for r in rows if r.get("load")]
    if load:
        print(f"\nUnder load: {load[0]['load']} requests at once of distinct {load[0]['prompt_tokens']}-token prompts")
        print(f"{'link':<9} {'mode':<14}{'tok/s':>7}{'TTFT50':>8}{'TTFT99':>8}{'wall':>7}{'xfer':>7}{'ratio':>7}")
        for r in load:
            print(
                f"{r['rate']:<9} {r['mode']:<14}{r['tokens_per_s']:>7.2f}{r['ttft_p50_s']:>8.2f}{r['ttft_p99_s']:>8.2f}"
                f"{r['e2e_s']:>7.2f}{_f(r.get('transfer_s'), '.2f', 7)}{_f(r.get('ratio'), '.2f', 7)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--rates", nargs="+", default=list(RATES), help="link rates, tc syntax (default: %(default)s)")
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS), help="prompt tokens")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=[m for m in MODES if m not in NO_HMA],
        choices=MODES,
        metavar="MODE",
        help=", ".join(MODES) + " (default: all but default-nohma)",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="requests at once in the load rows; 0: none")
    parser.add_argument(
        "--nixl-pollers",
        choices=("idle", "prefill-idle", "share"),
        default="prefill-idle",
        help="NIXL's busy-polling progress threads: the prefill's run SCHED_IDLE (prefill-idle, the default), "
        "both sides' (idle), or none (share: each takes half its instance's core)",
    )
    parser.add_argument(
        "--recompute-tokens-per-s",
        type=float,
        default=RECOMPUTE_TOKENS_PER_S,
        help="the adaptive mode's decode: its own prefill rate, below which it recomputes (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (the embedded model), gemma3-270m (a sliding-window hybrid), or a checkpoint directory",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/e2e.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/e2e.png"))
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "cachegen-bench-e2e")
    parser.add_argument(
        "--from-json", type=Path, help="print the table and plot of an earlier run's JSON; measure nothing"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers stopped, namespaces removed
    modes = [m for m in MODES if m in args.modes]
    require_bench_extra(need_nixl="nixl" in modes and not args.from_json)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_table(saved["rows"], saved["reps"])
        plot(saved["rows"], args.plot)
        return
    if max(args.lengths) * 2 + len(modes) * args.concurrency * LOAD_TOKENS > 110_000:
        sys.exit("the prompts would run past the text's 113K tokens: fewer --lengths or less --concurrency")
    from cachegen_vllm.offline.model import model_path
    from cachegen_vllm.testing.netns import shaped_link, unavailable

    if why := unavailable():
        sys.exit(f"bench_e2e needs network namespaces: {why}")
    model = model_path(args.model)
    args.logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with shaped_link(args.rates[0], delay_ms=1.0) as link, tempfile.NamedTemporaryFile(suffix=".json") as out:
        spec = {
            "link": dataclasses.asdict(link),
            "rates": args.rates,
            "lengths": args.lengths,
            "modes": modes,
            "reps": args.reps,
            "concurrency": args.concurrency,
            "nixl_pollers": args.nixl_pollers,
            "recompute_tokens_per_s": args.recompute_tokens_per_s,
            "logs": str(args.logs),
            "out": out.name,
            "model": str(model),
        }
        inner = subprocess.Popen(link.command("far", [sys.executable, __file__, "inside", json.dumps(spec)]))
        try:
            failed = inner.wait()
        finally:  # on Ctrl-C or SIGTERM too: it stops the servers it started
            if inner.poll() is None:
                inner.terminate()
                inner.wait(60)
        text = Path(out.name).read_text()
    result = json.loads(text) if text else {"rows": []}
    saved = {
        "max_tokens": MAX_TOKENS,
        "reps": args.reps,
        "concurrency": args.concurrency,
        "nixl_pollers": args.nixl_pollers,
        "model": Path(str(model)).name,
        "startup_s": result.get("startup_s"),  # per phase: every mode but nixl, then nixl
        "measure_s": result.get("measure_s"),  # per phase and rate
        "total_s": time.perf_counter() - started,
        "rows": sorted(
            result["rows"],
            key=lambda r: (bool(r.get("load")), rate_key(r["rate"]), r["prompt_tokens"], MODES.index(r["mode"])),
        ),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if failed:
        partial = args.json.with_suffix(".partial.json")
        partial.write_text(json.dumps(saved, indent=1) + "\n")
        sys.exit(f"the measurement failed (logs in {args.logs}; the rates done so far in {partial})")
    print_table(saved["rows"], args.reps)
    args.json.write_text(json.dumps(saved, indent=1) + "\n")
    plot(saved["rows"], args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "inside":
        inside(json.loads(sys.argv[2]))
    else:
        main()

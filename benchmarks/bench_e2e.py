"""TTFT and end-to-end latency of disaggregated prefill/decode through the proxy, with the prefill
and decode instances in two network namespaces joined by a shaped veth link (root needed).

    .venv/bin/python benchmarks/bench_e2e.py --json benchmarks/results/e2e.json --plot benchmarks/results/e2e.png

Per link rate and prompt length (1K, 2K, 3K tokens of English text), the median over --reps of:
  prefill   the prefill instance alone computing the prompt (max_tokens=1, nothing sent): the part
            of P/D TTFT that is not transfer;
  recompute the decode instance computing the prompt itself, no transfer (its TTFT);
  raw, default                      P/D with exact bf16 KV (profile "raw") or the default profile,
                                    the proxy starting both legs at once (the transfer overlaps the
                                    prefill's compute, layer by layer);
  raw-sequential, default-sequential the same with the proxy's `--no-overlap` (decode leg after the
                                    prefill's answer: nothing hides the transfer).
The overhead of a P/D mode is its TTFT less `prefill`: what moving the KV costs (encode, wire,
decode, the proxy's second leg). Prefix caching is off, so every repetition computes everything.
The proxy and the client sit in the decode's namespace; the prefill's HTTP answers and its KV
cross the shaped link. Each instance, all its processes, is pinned to one core of the machine
(taskset): a decode waiting for KV steps its engine continuously, and unpinned it steals the
prefill's core.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LENGTHS = (1024, 2048, 3072)
MAX_TOKENS = 32
KV_PORTS = {"raw": 5611, "default": 5612}
HTTP_PORTS = {
    "raw": 8111,
    "default": 8112,
    "decode": 8200,
    "proxy-raw": 8301,
    "proxy-default": 8302,
    "proxy-raw-sequential": 8303,
    "proxy-default-sequential": 8304,
}
PD_MODES = ("raw", "default", "raw-sequential", "default-sequential")  # mode -> profile: the part before "-"
MODES = ("prefill", "recompute", *PD_MODES)


def prompts(model: str) -> dict[int, list[int]]:
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
    return {n: ids[n : 2 * n] for n in LENGTHS}  # distinct texts per length


def stream_ttft(url: str, body: dict) -> tuple[float, float]:
    """(time to first token, time to the last) of a streamed completion."""
    import httpx

    started, first = time.perf_counter(), None
    with httpx.stream("POST", url, json=dict(body, stream=True), timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = first or time.perf_counter()
    return first - started, time.perf_counter() - started


def inside(near_ns: str, near_ip: str, rate: str, reps: int, logs: Path, out: Path) -> None:
    """Runs in the decode's namespace: starts everything, measures, writes JSON rows."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from cachegen_vllm.launch import (
        cachegen_counters,
        kv_transfer_config,
        post,
        start_instance,
        stop_all,
        wait_healthy,
        warm_up,
    )
    from cachegen_vllm.model import default_model_dir

    model = str(default_model_dir())
    no_cache = ("--no-enable-prefix-caching",)
    procs = {}
    urls = {name: f"http://{near_ip if name in KV_PORTS else '127.0.0.1'}:{port}" for name, port in HTTP_PORTS.items()}
    try:
        for profile, port in KV_PORTS.items():
            config = kv_transfer_config("kv_producer", {"profile": profile, "bind": f"tcp://{near_ip}:{port}"})
            procs[profile] = start_instance(
                model,
                HTTP_PORTS[profile],
                logs / f"{rate}-{profile}.log",
                config,
                launcher=["ip", "netns", "exec", near_ns, "taskset", "-c", "0"],
                cores="0",
                extra_args=no_cache,
                host="0.0.0.0",
            )
        procs["decode"] = start_instance(
            model,
            HTTP_PORTS["decode"],
            logs / f"{rate}-decode.log",
            kv_transfer_config("kv_consumer", {}),
            launcher=["taskset", "-c", "1"],
            cores="1",
            extra_args=no_cache,
        )
        for mode in PD_MODES:
            procs[f"proxy-{mode}"] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cachegen_vllm.cli",
                    "proxy",
                    "--prefill",
                    urls[mode.split("-")[0]],
                    "--decode",
                    urls["decode"],
                    "--port",
                    str(HTTP_PORTS[f"proxy-{mode}"]),
                    *(["--no-overlap"] if mode.endswith("sequential") else []),
                ],
                stdout=open(logs / f"{rate}-proxy-{mode}.log", "w"),  # noqa: SIM115 (the child owns it)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for name, proc in procs.items():
            wait_healthy(urls[name], proc, timeout_s=600)
        for name in (*KV_PORTS, "decode"):
            warm_up(urls[name], model)
        for mode in PD_MODES:  # a proxy learns each prefill's KV endpoint from its first answer
            warm_up(urls[f"proxy-{mode}"], model)
        rows = []
        for tokens, ids in prompts(model).items():
            body = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0}
            timings: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
            counters: dict[str, dict[str, float]] = {}
            for _ in range(reps):
                started = time.perf_counter()
                post(f"{urls['default']}/v1/completions", dict(body, max_tokens=1))
                elapsed = time.perf_counter() - started
                timings["prefill"].append((elapsed, elapsed))
                timings["recompute"].append(stream_ttft(f"{urls['decode']}/v1/completions", body))
                for mode in PD_MODES:
                    before = cachegen_counters(urls["decode"])
                    timings[mode].append(stream_ttft(f"{urls[f'proxy-{mode}']}/v1/completions", body))
                    after = cachegen_counters(urls["decode"])
                    counters[mode] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            for mode, samples in timings.items():
                row = {
                    "rate": rate,
                    "prompt_tokens": tokens,
                    "mode": mode,
                    "ttft_s": statistics.median(t for t, _ in samples),
                    "e2e_s": statistics.median(e for _, e in samples),
                    "samples": samples,
                }
                if mode in counters:
                    c = counters[mode]
                    row.update(
                        wire_bytes=c.get("wire_bytes", 0),
                        raw_bytes=c.get("raw_bytes", 0),
                        failures=c.get("failures", 0),
                        decode_transfer_s=c.get("transfer_seconds", 0),
                        decode_decode_s=c.get("decode_seconds", 0),
                    )
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        out.write_text(json.dumps(rows))
    finally:
        stop_all(list(procs.values()))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["rate"] for r in rows}, key=lambda r: ("gbit" in r, r))
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4), sharey=True, squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for mode, style in (
            ("prefill", "k:"),
            ("recompute", "C1--"),
            ("raw-sequential", "C3o:"),
            ("default-sequential", "C0s:"),
            ("raw", "C3o-"),
            ("default", "C0s-"),
        ):
            pts = sorted((r["prompt_tokens"], r["ttft_s"]) for r in rows if r["rate"] == rate and r["mode"] == mode)
            label = {
                "prefill": "prefill alone (no transfer)",
                "recompute": "decode recomputes",
                "raw": "P/D raw bf16, overlapped",
                "default": "P/D default profile, overlapped",
                "raw-sequential": "P/D raw bf16, sequential",
                "default-sequential": "P/D default profile, sequential",
            }[mode]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"link {rate}")
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TTFT (s), median")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M on vLLM CPU, prefill and decode in two namespaces over a shaped veth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: list[dict], reps: int) -> None:
    by = {(r["rate"], r["prompt_tokens"], r["mode"]): r for r in rows}
    print(
        f"\nTTFT in s, median of {reps}; overhead (ovh, overlapped) = TTFT - prefill; "
        "seq = --no-overlap, ovl = the proxy's default"
    )
    print(
        f"{'link':<9}{'tokens':>7}{'prefill':>9}{'recomp':>8}{'raw seq':>9}{'def seq':>9}{'raw ovl':>9}{'def ovl':>9}"
        f"{'ovh raw':>9}{'ovh def':>9}{'def/raw':>9}{'ratio':>7}"
    )
    for rate in dict.fromkeys(r["rate"] for r in rows):
        for tokens in LENGTHS:
            t = {m: by[(rate, tokens, m)]["ttft_s"] for m in MODES}
            raw_ovh, def_ovh = t["raw"] - t["prefill"], t["default"] - t["prefill"]  # the proxy's default mode
            d = by[(rate, tokens, "default")]
            ratio = d["raw_bytes"] / d["wire_bytes"] if d["wire_bytes"] else float("nan")
            print(
                f"{rate:<9}{tokens:>7}{t['prefill']:>9.2f}{t['recompute']:>8.2f}{t['raw-sequential']:>9.2f}{t['default-sequential']:>9.2f}"
                f"{t['raw']:>9.2f}{t['default']:>9.2f}{raw_ovh:>9.2f}{def_ovh:>9.2f}"
                f"{def_ovh / raw_ovh:>9.2f}{ratio:>7.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/e2e.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/e2e.png"))
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "cachegen-bench-e2e")
    parser.add_argument(
        "--from-json", type=Path, help="print the table and plot of an earlier run's JSON; measure nothing"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers stopped, namespaces removed
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        print_table(saved["rows"], saved["reps"])
        plot(saved["rows"], args.plot)
        return
    from cachegen_vllm.model import ensure_default_model
    from cachegen_vllm.testing.netns import shaped_link, unavailable

    if why := unavailable():
        sys.exit(f"bench_e2e needs network namespaces: {why}")
    ensure_default_model()
    args.logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for rate in args.rates:
        with shaped_link(rate, delay_ms=1.0) as link, tempfile.NamedTemporaryFile(suffix=".json") as out:
            inner = subprocess.Popen(
                link.command(
                    "far",
                    [
                        sys.executable,
                        __file__,
                        "inside",
                        link.near,
                        link.near_ip,
                        rate,
                        str(args.reps),
                        str(args.logs),
                        out.name,
                    ],
                )
            )
            try:
                if inner.wait():
                    sys.exit(f"the measurement at {rate} failed (logs in {args.logs})")
            finally:  # on Ctrl-C or SIGTERM too: it stops the servers it started
                if inner.poll() is None:
                    inner.terminate()
                    inner.wait(60)
            rows += [dict(r, delay_ms_applied=link.delay_ms) for r in json.loads(Path(out.name).read_text())]
    print_table(rows, args.reps)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"max_tokens": MAX_TOKENS, "reps": args.reps, "rows": rows}, indent=1) + "\n")
    plot(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "inside":
        near_ns, near_ip, rate, reps, logs, out = sys.argv[2:8]
        inside(near_ns, near_ip, rate, int(reps), Path(logs), Path(out))
    else:
        main()

"""A soak: mixed load for tens of minutes through vLLM's P/D router and our proxy, the decode and
the prefill each restarted once mid-way, hostile clients beside. Is anything lost, does memory
stay flat, is the producer's buffer empty at the end?

    .venv/bin/pip install -e '.[bench]'   # matplotlib, vllm-router
    .venv/bin/python benchmarks/soak.py --minutes 25   # writes benchmarks/results/soak.json and soak.png

One prefill (core 0, profile default) and one decode (core 1, recompute on any failure) on the
embedded model, vLLM's router and our proxy in front of both. --clients clients each send, one
after the other, requests of a random front (router or proxy), length (70% short, 100-300 tokens;
30% long, 1,000-2,000), streamed or not, and abort a tenth of them (a streamed one after its first
token, another by a 0.5 s timeout); a request that fails (a backend restarting) is sent again for
up to 120 s, and counted failed only then. Beside them, the attacks of tests/test_hostile.py
and test_e2e.py: made-up kv_transfer_params straight to the decode and through the proxy, and a
stranger on the producer's port pulling made-up transfers and ending others. At a third of the
run the decode is restarted, at two thirds the prefill (same ports). Every 10 s the RSS of each
instance (all its processes), the router and the proxy is sampled.

Reported: requests sent, answered, aborted on purpose, failed; the decode's transfers, requests it
recomputed after a failed transfer (by kind) and refused params; the prefill's strangers; RSS per
process over time (growth after a 3-minute warm-up of each lifetime); the prefill's send buffer at
the end (queued minus freed bytes, after its ttl_s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cachegen_vllm.offline.model import ensure_default_model
from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    start_instance,
    start_router,
    stop_all,
    wait_healthy,
    warm_up,
)
from cachegen_vllm.testing.ports import free_ports

KV_CACHE_BYTES = 1 << 30
MAX_TOKENS = 16
TTL_S = 30.0
WARM_S = 180.0
RETRY_S = 120.0


class Cluster:
    """The instances, the router and the proxy, on fixed ports so that a restart keeps its URL."""

    def __init__(self, logs: Path):
        self.logs, self.model = logs, ensure_default_model()
        base = free_ports(7)
        self.ports = {"prefill": base, "decode": base + 1, "router": base + 2, "metrics": base + 3, "proxy": base + 4}
        self.producer = f"tcp://127.0.0.1:{base + 5}"
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items() if name != "metrics"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.lives = {"prefill": 0, "decode": 0}

    def start(self, name: str) -> None:
        self.lives[name] += 1
        extra = {"profile": "default", "bind": self.producer, "ttl_s": TTL_S} if name == "prefill" else {}
        role = "kv_producer" if name == "prefill" else "kv_consumer"
        core = "0" if name == "prefill" else "1"
        self.procs[name] = start_instance(
            self.model,
            self.ports[name],
            self.logs / f"{name}-{self.lives[name]}.log",
            kv_transfer_config(role, extra),
            launcher=["taskset", "-c", core],
            cores=core,
            kv_cache_bytes=KV_CACHE_BYTES,
        )
        wait_healthy(self.urls[name], self.procs[name], timeout_s=600)
        warm_up(self.urls[name], str(self.model))

    def start_fronts(self) -> None:
        self.procs["router"] = start_router(
            [self.urls["prefill"]],
            [self.urls["decode"]],
            self.ports["router"],
            self.ports["metrics"],
            self.logs / "router.log",
        )
        argv = [sys.executable, "-m", "cachegen_vllm.serving.proxy", "--port", str(self.ports["proxy"])]
        argv += ["--prefill", self.urls["prefill"], "--decode", self.urls["decode"]]
        log = open(self.logs / "proxy.log", "w")  # noqa: SIM115 (the child owns it)
        self.procs["proxy"] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for name in ("router", "proxy"):
            wait_healthy(self.urls[name], self.procs[name], timeout_s=60)

    def restart(self, name: str) -> None:
        stop_all([self.procs[name]])
        self.start(name)

    def rss_mib(self) -> dict[str, float]:
        """Resident memory of each instance (every process of its session), the router and the proxy."""
        sessions = {proc.pid: name for name, proc in self.procs.items() if proc.poll() is None}
        out = dict.fromkeys(sessions.values(), 0.0)
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            name = sessions.get(int(stat[stat.rindex(")") + 2 :].split()[3]))
            rss = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
            if name is not None and rss is not None:
                out[name] += int(rss) / 1024
        return {name: round(mib, 1) for name, mib in out.items()}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "answered": 0, "aborted": 0, "failed": 0, "retries": 0, "attacks": 0}
        self.errors: list[str] = []

    def add(self, key: str, error: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if error is not None and len(self.errors) < 50:
                self.errors.append(error)


def prompt_text(ids: list[int], rng: random.Random) -> list[int]:
    length = rng.randint(100, 300) if rng.random() < 0.7 else rng.randint(1000, 2000)
    start = rng.randrange(0, len(ids) - length)
    return ids[start : start + length]


def one_request(url: str, body: dict, abort: bool, timeout_s: float) -> None:
    """A request; raises on any failure. An abort closes the connection after the first token (a
    streamed request) or by a short timeout (another)."""
    import httpx

    if body.get("stream"):
        with httpx.stream("POST", url, json=body, timeout=timeout_s) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {") and abort:
                    return
        return
    r = httpx.post(url, json=body, timeout=0.5 if abort else timeout_s)
    r.raise_for_status()


def client(cluster: Cluster, ids: list[int], tally: Tally, until: float, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    while time.monotonic() < until:
        front = rng.choice(("router", "proxy"))
        stream, abort = rng.random() < 0.5, rng.random() < 0.1
        body = {"model": str(cluster.model), "prompt": prompt_text(ids, rng), "max_tokens": MAX_TOKENS}
        body.update(temperature=0, stream=stream)
        url = f"{cluster.urls[front]}/v1/completions"
        tally.add("sent")
        if abort:
            with contextlib.suppress(httpx.HTTPError):
                one_request(url, body, True, 600)
            tally.add("aborted")
            continue
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                one_request(url, body, False, 600)
                tally.add("answered")
                break
            except httpx.HTTPError as e:
                if time.monotonic() > deadline:
                    tally.add("failed", f"{front}: {e!r}")
                    break
                tally.add("retries")
                time.sleep(2)


def http_attacker(cluster: Cluster, tally: Tally, until: float) -> None:
    """Made-up params straight to the decode and through the proxy."""
    import httpx

    rng = random.Random(7)
    while time.monotonic() < until:
        params = {"do_remote_prefill": True, "transfer_id": f"cg-{rng.getrandbits(64):x}"}
        params |= rng.choice(
            [
                {"transfer_secret": "ab" * 16, "producer": "tcp://127.0.0.1:65534", "producer_tp": 3},
                {"transfer_secret": "ab" * 16, "producer": cluster.producer},  # another request's place
                {"producer": "tcp://127.0.0.1"},
            ]
        )
        body = {"model": str(cluster.model), "prompt": "Hello", "max_tokens": 2, "kv_transfer_params": params}
        for front in ("decode", "proxy"):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{cluster.urls[front]}/v1/completions", json=body, timeout=60)
            tally.add("attacks")
        time.sleep(2)


def transport_attacker(cluster: Cluster, tally: Tally, until: float) -> None:
    """A stranger on the producer's port: PULLs of made-up transfers, DONE and CANC of others."""
    import zmq

    from cachegen_vllm.transport import protocol as P

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(cluster.producer)
    rng = random.Random(11)
    while time.monotonic() < until:
        tid = f"cg-{rng.getrandbits(128):032x}".encode()
        args = P.PULL_ARGS.pack(0, 16, 1 << 26, 0, 1, 0)
        for parts in ([P.PULL, tid, args, rng.randbytes(16)], [P.DONE, tid], [P.CANC, tid], [P.PING]):
            with contextlib.suppress(zmq.Again):
                sock.send_multipart(parts, zmq.NOBLOCK)
        while sock.poll(0):
            sock.recv_multipart()
        tally.add("attacks")
        time.sleep(0.01)
    sock.close()


def plot(samples: list[dict], restarts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in ("prefill", "decode", "router", "proxy"):
        points = [(s["t"] / 60, s["rss_mib"][name]) for s in samples if name in s["rss_mib"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], ".-", markersize=3, label=name)
    for event in restarts:
        ax.axvline(event["t"] / 60, color="grey", linestyle=":")
        ax.annotate(f"{event['name']} restarted", (event["t"] / 60, ax.get_ylim()[1]), fontsize=8, va="top")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS, MiB (all processes of each)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("soak: resident memory over time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def growth(samples: list[dict], restarts: list[dict]) -> dict[str, list[float]]:
    """Per process, its RSS growth (MiB) from WARM_S into each lifetime to that lifetime's end."""
    starts = {"prefill": [0.0], "decode": [0.0], "router": [0.0], "proxy": [0.0]}
    for event in restarts:
        starts[event["name"]].append(event["t"])
    out: dict[str, list[float]] = {}
    for name, begins in starts.items():
        for i, begin in enumerate(begins):
            end = begins[i + 1] if i + 1 < len(begins) else float("inf")
            life = [s["rss_mib"][name] for s in samples if begin + WARM_S <= s["t"] < end and name in s["rss_mib"]]
            if len(life) > 1:
                out.setdefault(name, []).append(round(life[-1] - life[0], 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=25)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/soak.json"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/soak.png"))
    parser.add_argument("--logs", type=Path, default=Path.home() / ".cache/cachegen-vllm/soak-logs")
    args = parser.parse_args()
    import matplotlib  # noqa: F401  (fail now, not after the run)
    from transformers import AutoTokenizer

    args.logs.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args.logs)
    tally, samples, restarts = Tally(), [], []
    try:
        cluster.start("prefill")
        cluster.start("decode")
        cluster.start_fronts()
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
        ids = AutoTokenizer.from_pretrained(str(cluster.model))(text).input_ids
        began = time.monotonic()
        until = began + args.minutes * 60
        counters = {"decode": [], "prefill": []}  # each lifetime's last reading
        threads = [threading.Thread(target=client, args=(cluster, ids, tally, until, i)) for i in range(args.clients)]
        threads += [
            threading.Thread(target=f, args=(cluster, tally, until)) for f in (http_attacker, transport_attacker)
        ]
        for thread in threads:
            thread.start()
        plan = [(args.minutes * 60 / 3, "decode"), (2 * args.minutes * 60 / 3, "prefill")]
        while time.monotonic() < until:
            now = time.monotonic() - began
            samples.append({"t": round(now, 1), "rss_mib": cluster.rss_mib(), **dict(tally.counts)})
            if plan and now >= plan[0][0]:
                _, name = plan.pop(0)
                counters[name].append(cachegen_counters(cluster.urls[name]))
                restarts.append({"t": round(now, 1), "name": name})
                print(f"{now / 60:.1f} min: restarting the {name}", flush=True)
                cluster.restart(name)
            else:
                time.sleep(10)
            print(f"{now / 60:.1f} min {tally.counts} {samples[-1]['rss_mib']}", flush=True)
        for thread in threads:
            thread.join()
        time.sleep(TTL_S + 5)  # what no decode pulled goes after ttl_s
        # the counters reach /metrics with the engine's steps: one more request makes some
        warm_up(cluster.urls["prefill"], str(cluster.model))
        time.sleep(5)
        for name in ("decode", "prefill"):
            counters[name].append(cachegen_counters(cluster.urls[name]))
    finally:
        stop_all(list(cluster.procs.values()))

    def total(name: str, key: str) -> float:
        return sum(reading.get(key, 0) for reading in counters[name])

    last_prefill = counters["prefill"][-1]
    summary = {
        **tally.counts,
        "decode_transfers": total("decode", "transfers"),
        "recomputed_after_a_failed_transfer": {
            key: total("decode", key)
            for key in sorted({k for r in counters["decode"] for k in r if k.startswith("failed_")})
        },
        "params_refused": total("decode", "params_refused"),
        "prefill_strangers": total("prefill", "strangers"),
        "prefill_evicted": total("prefill", "evicted"),
        "producer_buffer_bytes_at_end": last_prefill.get("queued_bytes", 0) - last_prefill.get("freed_bytes", 0),
        "rss_growth_mib_after_warm_up": growth(samples, restarts),
    }
    setup = {"minutes": args.minutes, "clients": args.clients, "max_tokens": MAX_TOKENS, "ttl_s": TTL_S}
    args.json.write_text(
        json.dumps(
            {"setup": setup, "summary": summary, "errors": tally.errors, "restarts": restarts, "samples": samples},
            indent=1,
        )
        + "\n"
    )
    plot(samples, restarts, args.plot)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()

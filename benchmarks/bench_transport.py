"""Transport goodput and first-frame latency, over loopback and over shaped veth links.

    .venv/bin/python benchmarks/bench_transport.py --json benchmarks/results/transport.json

The producer and the consumer run as separate processes (in two network namespaces for the
shaped links; root needed). The producer queues the frames of one transfer as fast as it can;
goodput is frame bytes over the time from the first frame queued to the last frame read, so it
counts ZeroMQ, TCP and the consumer's checksum check. First-frame latency is the time from the
first frame queued to its arrival at the consumer, with the consumer already waiting (both clocks
are the machine's one monotonic clock). The "paced" row makes the frames at 80% of a 100 Mbit/s
link's rate, one by one, as a prefill makes its layers: with the consumer pulling from the start,
the last frame should arrive about when it was made ("made in" vs "s").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FRAME_TOKENS = 256  # one frame: 256 tokens of a Llama-3-8B-like layer (8 KV heads x 128), exact bf16: 1 MiB
TRANSFER_ID = "bench"
SECRET = bytes(16)  # both ends are this script: any secret they share


def _frame() -> bytes:
    import torch

    from cachegen_vllm.codec import KVGeometry, encode_layer
    from cachegen_vllm.codec.profile import EXACT_BITS
    from cachegen_vllm.config import profile_from_dict

    geometry = KVGeometry(32, 8, 128, torch.bfloat16, model="bench")
    profile = profile_from_dict(
        {"chunk_tokens": FRAME_TOKENS, "group_tokens": 1, "bits": {"key": EXACT_BITS, "value": EXACT_BITS}}, "raw"
    )
    kv = torch.randn(FRAME_TOKENS, 8, 128).bfloat16()
    return encode_layer(kv, kv, geometry=geometry, profile=profile, layer=0)[0]


def produce(bind: str, frames: int, pace_ms: float = 0.0) -> None:
    from cachegen_vllm.transport import FrameProducer
    from cachegen_vllm.transport.config import TransportConfig

    frame = _frame()
    producer = FrameProducer(TransportConfig(bind=bind, max_buffer_bytes=frames * len(frame) + 1))
    print(json.dumps({"endpoint": producer.endpoint}), flush=True)
    sys.stdin.readline()  # the consumer is waiting
    first = time.monotonic()
    producer.open(TRANSFER_ID, SECRET)
    for _ in range(frames):
        producer.put(TRANSFER_ID, frame)
        time.sleep(pace_ms / 1000)  # a producer that makes frames at a model's pace, not at once
    produced = time.monotonic() - first
    producer.finish(TRANSFER_ID)
    deadline = time.monotonic() + 600
    while producer.transfers and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({"first_put": first, "frame_bytes": len(frame), "produced_s": produced}), flush=True)
    producer.close()


def consume(endpoint: str) -> None:
    from cachegen_vllm.transport import FrameConsumer
    from cachegen_vllm.transport.config import TransportConfig

    consumer = FrameConsumer(TransportConfig(peer_timeout_s=30))
    stream = consumer.fetch(endpoint, TRANSFER_ID, SECRET, timeout_s=600)
    print(json.dumps({"waiting": True}), flush=True)
    first = None
    nbytes = frames = 0
    for frame in stream:
        first = first or time.monotonic()
        nbytes += len(frame.data)
        frames += 1
    print(
        json.dumps({"first_frame": first, "last_frame": time.monotonic(), "bytes": nbytes, "frames": frames}),
        flush=True,
    )
    consumer.close()


def run_transfer(
    frames: int, producer_cmd: list[str], consumer_cmd: list[str], bind: str, pace_ms: float = 0.0
) -> dict:
    """One transfer between two processes; returns bytes, goodput and first-frame latency."""
    me = [sys.executable, __file__]
    prod = subprocess.Popen(
        producer_cmd + me + ["produce", bind, str(frames), str(pace_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = json.loads(prod.stdout.readline())["endpoint"]
        cons = subprocess.Popen(consumer_cmd + me + ["consume", endpoint], stdout=subprocess.PIPE, text=True)
        json.loads(cons.stdout.readline())
        time.sleep(0.5)  # let the consumer's PULL reach the producer
        prod.stdin.write("go\n")
        prod.stdin.flush()
        got = json.loads(cons.stdout.readline())
        sent = json.loads(prod.stdout.readline())
        cons.wait(60)
        prod.wait(60)
    finally:
        prod.kill()
    seconds = got["last_frame"] - sent["first_put"]
    return {
        "frames": got["frames"],
        "frames_expected": frames,
        "bytes": got["bytes"],
        "seconds": seconds,
        "goodput_gbit_s": 8 * got["bytes"] / seconds / 1e9,
        "first_frame_ms": 1000 * (got["first_frame"] - sent["first_put"]),
        "produced_s": sent["produced_s"],
    }


def run_link(rate: str, delay_ms: float, frames: int, pace_ms: float = 0.0) -> dict:
    from cachegen_vllm.testing.netns import shaped_link

    with shaped_link(rate, delay_ms) as link:
        result = run_transfer(
            frames, link.command("near", []), link.command("far", []), f"tcp://{link.near_ip}:0", pace_ms
        )
        return {"delay_ms_applied": link.delay_ms, **result}


RATES = {"100mbit": 0.1, "1gbit": 1.0, "10gbit": 10.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="about how long each shaped transfer lasts")
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from cachegen_vllm.testing.netns import unavailable

    rows = [{"link": "loopback", **run_transfer(1024, [], [], "tcp://127.0.0.1:0")}]
    skip = unavailable()
    for name, gbit in RATES.items():
        if skip:
            print(f"skipping {name}: {skip}", file=sys.stderr)
            continue
        frames = max(16, int(gbit * 1e9 / 8 * args.seconds / (1 << 20)))
        result = run_link(name, args.delay_ms, frames)
        row = {"link": f"{name}, {result['delay_ms_applied']:g} ms", **result}
        row["fraction_of_link"] = row["goodput_gbit_s"] / gbit
        rows.append(row)
    if not skip:  # frames made at a pace the link could carry, as a prefill makes them: do they arrive as made?
        frames = int(args.seconds * 0.1e9 / 8 / (1 << 20) * 0.8)
        pace_ms = 1000 * args.seconds / frames
        result = run_link("100mbit", args.delay_ms, frames, pace_ms)
        rows.append(
            {"link": f"100mbit paced {pace_ms:.0f}ms", **result, "fraction_of_link": result["goodput_gbit_s"] / 0.1}
        )
    print(f"{'link':<22}{'MiB':>8}{'made in':>9}{'s':>8}{'Gbit/s':>9}{'of link':>9}{'first frame':>13}")
    for r in rows:
        share = f"{100 * r['fraction_of_link']:.0f}%" if "fraction_of_link" in r else "-"
        print(
            f"{r['link']:<22}{r['bytes'] / 2**20:>8.0f}{r['produced_s']:>9.2f}{r['seconds']:>8.2f}"
            f"{r['goodput_gbit_s']:>9.2f}{share:>9}{r['first_frame_ms']:>11.1f}ms"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"delay_ms": args.delay_ms, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "produce":
        produce(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "consume":
        consume(sys.argv[2])
    else:
        main()

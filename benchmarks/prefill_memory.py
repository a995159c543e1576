"""Where a prefill's resident memory goes under a long run (benchmarks/soak.py saw it grow while the
decode's stayed flat): the connector's, or vLLM's own?

    .venv/bin/python benchmarks/prefill_memory.py --phase-s 240   # writes benchmarks/results/prefill_memory.json

One prefill instance (core 0, profile default, ttl_s 30, as in the soak), nothing else; three
phases of --phase-s each, the RSS of all its processes sampled every 15 s, with the producer's
buffered bytes (queued minus freed):

- ``stranger``: only the soak's transport attacker (made-up PULLs, DONE, CANC and PINGs);
- ``plain``: two clients sending the soak's prompts (random lengths) with no transfer asked;
- ``transfers``: the same prompts again, in the same order, each asking for a remote decode
  (``do_remote_decode``); no decode pulls, so every transfer waits out ttl_s in the send buffer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import Cluster, Tally, prompt_text, transport_attacker

from cachegen_vllm.serving.launch import cachegen_counters, post, stop_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-s", type=float, default=240)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/prefill_memory.json"))
    parser.add_argument("--logs", type=Path, default=Path.home() / ".cache/cachegen-vllm/prefill-memory-logs")
    args = parser.parse_args()
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    args.logs.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(args.logs)
    samples: list[dict] = []
    counts: dict[str, int] = {}
    try:
        cluster.start("prefill")
        url, model = cluster.urls["prefill"], str(cluster.model)
        ids = AutoTokenizer.from_pretrained(model)("\n\n".join(topics[k] for k in sorted(topics))).input_ids
        began = time.monotonic()

        def sample(phase: str) -> None:
            counters = cachegen_counters(url)
            buffered = counters.get("queued_bytes", 0) - counters.get("freed_bytes", 0)
            samples.append(
                {
                    "phase": phase,
                    "t": round(time.monotonic() - began, 1),
                    "rss_mib": cluster.rss_mib()["prefill"],
                    "buffered_mib": round(buffered / 2**20, 1),
                }
            )
            print(samples[-1], flush=True)

        def run(phase: str, workers: list[threading.Thread], until: float) -> None:
            for worker in workers:
                worker.start()
            while time.monotonic() < until:
                sample(phase)
                time.sleep(15)
            for worker in workers:
                worker.join()

        until = time.monotonic() + args.phase_s
        tally = Tally()
        run("stranger", [threading.Thread(target=transport_attacker, args=(cluster, tally, until))], until)
        counts["stranger_attacks"] = tally.counts["attacks"]
        for phase, params in (("plain", None), ("transfers", {"do_remote_decode": True})):
            until, rng, sent = time.monotonic() + args.phase_s, random.Random(3), [0]

            def client(params=params, rng=rng, sent=sent, until=until) -> None:
                while time.monotonic() < until:
                    body = {"model": model, "prompt": prompt_text(ids, rng), "max_tokens": 1, "temperature": 0}
                    if params is not None:
                        body["kv_transfer_params"] = params
                    post(f"{url}/v1/completions", body)
                    sent[0] += 1

            run(phase, [threading.Thread(target=client) for _ in range(2)], until)
            counts[f"{phase}_requests"] = sent[0]
        time.sleep(40)  # past ttl_s: the buffer empties
        sample("end")
    finally:
        stop_all(list(cluster.procs.values()))
    growth = {}
    for phase in ("stranger", "plain", "transfers"):
        rss = [s["rss_mib"] for s in samples if s["phase"] == phase]
        growth[phase] = round(rss[-1] - rss[0], 1)
    result = {"phase_s": args.phase_s, "counts": counts, "rss_growth_mib": growth, "samples": samples}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"counts": counts, "rss_growth_mib": growth}, indent=1))


if __name__ == "__main__":
    main()

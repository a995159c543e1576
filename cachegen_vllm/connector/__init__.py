"""The vLLM KV connector (``kv_connector: CacheGenConnector``): a facade (`connector`) over a
scheduler side (`scheduler`) and a worker side (`worker`), with the metadata between them
(`metadata`), its counters (`metrics`) and vLLM's plugin entry point (`plugin`).

``kv_connector_module_path: cachegen_vllm.connector`` names this package; the class is imported
from it only when vLLM asks for it, so that loading the plugin imports nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachegen_vllm.connector.connector import CacheGenConnector

__all__ = ["CacheGenConnector"]


def __getattr__(name: str) -> Any:
    if name == "CacheGenConnector":
        from cachegen_vllm.connector.connector import CacheGenConnector

        return CacheGenConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

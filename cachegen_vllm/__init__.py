"""cachegen-vllm: CacheGen KV-cache compression and streaming for disaggregated vLLM serving."""

__version__ = "0.1.0"

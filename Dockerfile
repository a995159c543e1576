# cachegen-vllm on the official vLLM OpenAI image (GPU) of the oldest vLLM it supports; the image
# runs vLLM's OpenAI server with this plugin installed:
#   docker build -t cachegen-vllm .
# Prefill (kv_producer): encodes each layer on a CUDA stream of its own as the forward pass goes,
# and serves the frames from port 5601 (tensor-parallel ranks: 5601 + rank; publish them all):
#   docker run --gpus all -p 8100:8000 -p 5601:5601 cachegen-vllm --model MODEL \
#     --kv-transfer-config '{"kv_connector":"CacheGenConnector","kv_role":"kv_producer",
#       "kv_connector_extra_config":{"profile":"default","bind":"tcp://0.0.0.0:5601","advertise":"tcp://PREFILL_HOST:5601"}}'
# Decode (kv_consumer): loads the KV, decoding on a stream of its own; on any failure it recomputes:
#   docker run --gpus all -p 8200:8000 cachegen-vllm --model MODEL \
#     --kv-transfer-config '{"kv_connector":"CacheGenConnector","kv_role":"kv_consumer","kv_load_failure_policy":"recompute"}'
# In front of them, vLLM's P/D router or this project's proxy (which overlaps the two legs):
#   docker run -p 8000:8000 --entrypoint cachegen-vllm cachegen-vllm proxy \
#     --prefill http://PREFILL_HOST:8100 --decode http://DECODE_HOST:8200 --port 8000
# The prefill runs its CUDA graphs piecewise (the connector asks vLLM to: a full graph's replay would
# skip the per-layer save); fp8 KV caches and MLA models are refused at start-up, by name.
FROM vllm/vllm-openai:v0.32.0
COPY pyproject.toml README.md /opt/cachegen-vllm/
COPY cachegen_vllm /opt/cachegen-vllm/cachegen_vllm
COPY kernels /opt/cachegen-vllm/kernels
COPY configs /opt/cachegen-vllm/configs
# --no-deps: the image's torch and vLLM are the ones to use; xxhash is the only addition.
RUN pip install --no-cache-dir xxhash && pip install --no-cache-dir --no-deps /opt/cachegen-vllm

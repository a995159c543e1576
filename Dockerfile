# cachegen-vllm on the official vLLM OpenAI image of the pinned vLLM version (GPU).
#   docker build -t cachegen-vllm .
# The image runs vLLM's OpenAI server with this plugin installed. Not yet usable on GPUs: the
# connector runs on vLLM's CPU backend only so far (docs/DESIGN.md, "What runs where"). Then:
#   prefill: docker run ... cachegen-vllm --model MODEL --port 8100 --kv-transfer-config \
#     '{"kv_connector":"CacheGenConnector","kv_role":"kv_producer","kv_connector_extra_config":{"bind":"tcp://0.0.0.0:5601","advertise":"tcp://PREFILL_HOST:5601"}}'
#   decode:  docker run ... cachegen-vllm --model MODEL --port 8200 --kv-transfer-config \
#     '{"kv_connector":"CacheGenConnector","kv_role":"kv_consumer","kv_load_failure_policy":"recompute"}'
#   proxy:   docker run ... --entrypoint cachegen-vllm cachegen-vllm proxy --prefill URL --decode URL
FROM vllm/vllm-openai:v0.32.0
COPY pyproject.toml README.md /opt/cachegen-vllm/
COPY cachegen_vllm /opt/cachegen-vllm/cachegen_vllm
COPY kernels /opt/cachegen-vllm/kernels
COPY configs /opt/cachegen-vllm/configs
# --no-deps: the image's torch and vLLM are the ones to use; xxhash is the only addition.
RUN pip install --no-cache-dir xxhash && pip install --no-cache-dir --no-deps /opt/cachegen-vllm

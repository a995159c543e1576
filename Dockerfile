# cachegen-vllm on the official vLLM OpenAI image (GPU) of vLLM 0.33, whose GPU default is the V2
# model runner; the image runs vLLM's OpenAI server with this plugin installed:
#   docker build -t cachegen-vllm .
# The Triton kernels compile at start-up, every variant on every rank: keep Triton's cache in a
# volume (-v cachegen-triton:/cache/triton below) and later starts load them instead.
# The examples follow README's "Security": the producer's port is CURVE-encrypted and accepts only
# the decodes whose public certificates are in keys/authorized (make them with
#   python -c "import zmq.auth; [zmq.auth.create_certificates('keys', n) for n in ('prefill', 'decode')]"
# and copy keys/decode.key into keys/authorized/), the decode loads only from the prefills it is
# told to allow, and neither HTTP port should face clients: the proxy does, behind your gateway.
# Prefill (kv_producer): encodes each layer on a CUDA stream of its own as the forward pass goes,
# and serves the frames from port 5601 (tensor-parallel ranks: 5601 + rank; publish them all):
#   docker run --gpus all -v $PWD/keys:/keys:ro -v cachegen-triton:/cache/triton -p 8100:8000 -p 5601:5601 \
#     cachegen-vllm --model MODEL \
#     --api-key $API_KEY --kv-transfer-config '{"kv_connector":"CacheGenConnector","kv_role":"kv_producer",
#       "kv_connector_extra_config":{"profile":"default","bind":"tcp://0.0.0.0:5601","advertise":"tcp://PREFILL_HOST:5601",
#         "curve_secret_key_file":"/keys/prefill.key_secret","curve_authorized_keys_dir":"/keys/authorized"}}'
# Decode (kv_consumer): loads the KV, decoding on a stream of its own; on any failure it recomputes:
#   docker run --gpus all -v $PWD/keys:/keys:ro -v cachegen-triton:/cache/triton -p 8200:8000 \
#     cachegen-vllm --model MODEL \
#     --api-key $API_KEY --kv-transfer-config '{"kv_connector":"CacheGenConnector","kv_role":"kv_consumer",
#       "kv_load_failure_policy":"recompute","kv_connector_extra_config":{"allowed_producers":["tcp://PREFILL_HOST:5601"],
#         "curve_secret_key_file":"/keys/decode.key_secret","curve_server_public_key_file":"/keys/prefill.key"}}'
# In front of them, vLLM's P/D router or this project's proxy (which overlaps the two legs and
# passes the clients' Authorization on to both):
#   docker run -p 8000:8000 --entrypoint cachegen-vllm cachegen-vllm proxy \
#     --prefill http://PREFILL_HOST:8100 --decode http://DECODE_HOST:8200 --host 0.0.0.0 --port 8000
# The prefill runs its CUDA graphs piecewise (the connector asks vLLM to: a full graph's replay would
# skip the per-layer save), and allocates max_encode_inflight_bytes (512 MiB) of pinned memory per
# rank for the frames on their way. Refused at start-up, by name: pipeline parallelism, speculative
# decoding, MLA models, hybrid models (several KV cache groups), values narrower or wider than keys,
# and KV cache dtypes other than the model's and fp8.
FROM vllm/vllm-openai:v0.33.0
ENV TRITON_CACHE_DIR=/cache/triton
COPY pyproject.toml README.md /opt/cachegen-vllm/
COPY cachegen_vllm /opt/cachegen-vllm/cachegen_vllm
COPY kernels /opt/cachegen-vllm/kernels
COPY configs /opt/cachegen-vllm/configs
# --no-deps: the image's torch and vLLM are the ones to use; xxhash is the only addition.
RUN pip install --no-cache-dir xxhash && pip install --no-cache-dir --no-deps /opt/cachegen-vllm

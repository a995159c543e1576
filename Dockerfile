# cachegen-vllm on the official vLLM OpenAI image of the pinned vLLM version (GPU).
#   docker build -t cachegen-vllm .
# The image runs vLLM's OpenAI server with this plugin installed; the prefill / decode commands
# are documented in README.md once the connector lands (see NOTES.md, "What is next").
FROM vllm/vllm-openai:v0.32.0
COPY pyproject.toml README.md /opt/cachegen-vllm/
COPY cachegen_vllm /opt/cachegen-vllm/cachegen_vllm
COPY kernels /opt/cachegen-vllm/kernels
COPY configs /opt/cachegen-vllm/configs
# --no-deps: the image's torch and vLLM are the ones to use; xxhash is the only addition.
RUN pip install --no-cache-dir xxhash && pip install --no-cache-dir --no-deps /opt/cachegen-vllm

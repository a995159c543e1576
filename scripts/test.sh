#!/usr/bin/env bash
# Set up, then check and test everything: lint and format (ruff), types (mypy, over the package),
# then the whole test suite (CPU only; the embedded model is converted on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"

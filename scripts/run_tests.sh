#!/usr/bin/env bash
# The test command: lint, format check, then every test (the real-model ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HF_PREFIX_CACHE_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check .
ruff format --check .
python -m pytest -q "$@"

#!/usr/bin/env bash
# The main job: multi-turn time-to-first-token evaluation on SmolLM2-135M-Instruct and MT-Bench.
# Extra arguments go to the harness (see eval/README.md), e.g. --conversations 20 --dataset sharegpt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HF_PREFIX_CACHE_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m hf_prefix_cache_eval "$@"

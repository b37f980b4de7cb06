#!/usr/bin/env bash
# Sets up everything the tests need, on a fresh machine too, and runs every tier:
# unit and integration (tests/), real vLLM + NIXL on the CPU (-m vllm), a real
# Kubernetes control plane with Helm (-m k8s) and a real Prometheus (-m prometheus).
# Extra arguments go to pytest, e.g. `scripts/test.sh tests` for the fast tier only.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --engine
for step in build-controlplane install-helm install-prometheus; do
  if [ -f "scripts/$step.sh" ]; then
    bash "scripts/$step.sh"
  fi
done
exec .venv/bin/pytest "$@"

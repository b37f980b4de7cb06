#!/usr/bin/env bash
# Sets up everything the tests need, on a fresh machine too, and runs every tier:
# unit and integration (tests/), real vLLM + NIXL on the CPU (-m vllm), a real
# Kubernetes control plane with Helm (-m k8s), a real Prometheus (-m prometheus),
# Tandem's own images (-m images) and a real single-node cluster running them (-m cluster).
# Extra arguments go to pytest, e.g. `scripts/test.sh tests` for the fast tier only.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --engine
for step in build-controlplane install-helm install-prometheus; do
  if [ -f "scripts/$step.sh" ]; then
    bash "scripts/$step.sh"
  fi
done
# The images the cluster tier runs (content-hashed: an unchanged tree rebuilds nothing).
if [ "${TANDEM_SKIP_IMAGES:-0}" != 1 ] && [ "${TANDEM_SKIP_CLUSTER:-0}" != 1 ]; then
  bash scripts/build-images.sh all
fi
exec .venv/bin/pytest "$@"

#!/usr/bin/env bash
# Installs Prometheus from Debian's packages (the e2e tests start it themselves).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-prometheus: needs root for apt-get (or install the 'prometheus' package yourself)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# apt may be busy with another install; wait for its lock rather than fail.
apt-get -o DPkg::Lock::Timeout=300 update -qq
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends prometheus >/dev/null
# The package's service is not wanted: the tests run their own instances.
command -v prometheus

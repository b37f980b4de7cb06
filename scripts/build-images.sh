#!/usr/bin/env bash
# Build Tandem's container images on this machine, without a container engine or
# a registry, from images/<name>/Containerfile (the same files `docker build` uses).
#
#   scripts/build-images.sh [tandem|vllm-cpu|all]...   (default: tandem)
#   scripts/build-images.sh --force vllm-cpu            (rebuild although up to date)
#
# Output: .tandem/images/tandem.tar and .tandem/images/tandem-vllm-cpu.tar, OCI image
# layouts packed as tars, named ghcr.io/tandem-dev/<image>:<version>:
#   ctr -n k8s.io images import .tandem/images/tandem.tar
# Up to date (prints so, in well under a second) when the Containerfile, the files it
# COPYs and the builder are unchanged. Needs root; installs mmdebstrap if missing.
# The logic is in images/build.py (standard library only).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ $EUID -ne 0 ]]; then
    echo "build-images: needs root (mmdebstrap, overlay mounts, chroot)" >&2
    exit 2
fi
if ! command -v mmdebstrap >/dev/null 2>&1; then
    echo "build-images: installing mmdebstrap" >&2
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq mmdebstrap >&2 \
        || { apt-get update -qq >&2 && apt-get -o DPkg::Lock::Timeout=300 install -y -qq mmdebstrap >&2; }
fi
start=$SECONDS
# The machine's python3 (3.11+: tomllib); never the repo's venv, never the tandem package.
python3 "$repo/images/build.py" "$@"
echo "build-images: done in $((SECONDS - start)) s" >&2

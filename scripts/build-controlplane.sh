#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
# kube-proxy, and the node's tiny pause and echo programs (scripts/cluster.sh)
# from e2e/controlplane/ (a Go wrapper module pinning k8s.io/kubernetes) into a
# cache outside the repo:
#
#   ${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}/controlplane/<k8s-version>/bin/
#
# The build runs once: when the binaries are there and were built from the
# same go.mod, go.sum, main packages and this script (a stamp holds their hash),
# the script only prints the folder. The last line on stdout is always the bin folder;
# progress goes to stderr.
#
# Environment:
#   TANDEM_CACHE_DIR   cache root (default: $HOME/.cache/tandem)
#   GO                 the go command (default: go on PATH, else /usr/local/go/bin/go)
#   TANDEM_GO_PARALLEL packages compiled at once (default: number of CPUs)
#   TANDEM_REBUILD=1   build even when the cache looks current
set -euo pipefail

log() { printf 'build-controlplane: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
module_dir="$repo_root/e2e/controlplane"
script_path="$repo_root/scripts/build-controlplane.sh"
[[ -f "$module_dir/go.mod" ]] || die "no go.mod in $module_dir"

# The cache is keyed by the k8s.io/kubernetes version the wrapper pins.
k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$module_dir/go.mod")"
[[ -n "$k8s_version" ]] || die "cannot read the k8s.io/kubernetes version from $module_dir/go.mod"
cache_root="${TANDEM_CACHE_DIR:-$HOME/.cache/tandem}"
version_dir="$cache_root/controlplane/$k8s_version"
bin_dir="$version_dir/bin"
stamp_file="$version_dir/build.stamp"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause echo)

source_hash() {
    # This script too: it sets the build flags.
    (cd "$module_dir" && cat "$script_path" go.mod go.sum $(find cmd -name '*.go' | LC_ALL=C sort)) \
        | sha256sum | cut -d' ' -f1
}

is_current() {
    local name
    for name in "${binaries[@]}"; do
        [[ -x "$bin_dir/$name" ]] || return 1
    done
    [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$want_hash" ]]
}

want_hash="$(source_hash)"
if [[ "${TANDEM_REBUILD:-0}" != 1 ]] && is_current; then
    log "up to date: $bin_dir"
    echo "$bin_dir"
    exit 0
fi

mkdir -p "$version_dir"
# One build at a time per version (parallel test sessions on a fresh machine).
exec 9>"$version_dir/.lock"
flock 9
if [[ "${TANDEM_REBUILD:-0}" != 1 ]] && is_current; then
    log "built by another process meanwhile: $bin_dir"
    echo "$bin_dir"
    exit 0
fi

go_cmd="${GO:-}"
if [[ -z "$go_cmd" ]]; then
    if command -v go >/dev/null 2>&1; then
        go_cmd="go"
    elif [[ -x /usr/local/go/bin/go ]]; then
        go_cmd="/usr/local/go/bin/go"
    else
        die "no Go toolchain (set GO=/path/to/go); Go >= $(awk '$1 == "go" {print $2}' "$module_dir/go.mod") is needed"
    fi
fi
go_version="$("$go_cmd" env GOVERSION 2>/dev/null)" || die "'$go_cmd env GOVERSION' failed: is $go_cmd a Go toolchain?"
log "building k8s.io/kubernetes $k8s_version with $go_version (a cold build takes minutes)"

# What upstream's hack/lib/version.sh stamps in, so /version reports a real
# release (helm and kubectl parse it) instead of v0.0.0-master.
minor="${k8s_version#v*.}"
minor="${minor%%.*}"
major="${k8s_version#v}"
major="${major%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit="
done

staging="$(mktemp -d "$version_dir/.build.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

start=$SECONDS
(
    cd "$module_dir"
    # Static binaries, as upstream releases them; -mod=readonly keeps go.sum honest.
    CGO_ENABLED=0 "$go_cmd" build -mod=readonly -trimpath \
        -p "${TANDEM_GO_PARALLEL:-$(nproc)}" \
        -ldflags "$ldflags" -o "$staging/" ./cmd/...
)
for name in "${binaries[@]}"; do
    [[ -x "$staging/$name" ]] || die "go build produced no $name"
done

# Swap the new binaries in only once all of them exist.
mkdir -p "$bin_dir"
for name in "${binaries[@]}"; do
    mv -f "$staging/$name" "$bin_dir/$name"
done
echo "$want_hash" >"$stamp_file"
log "built ${binaries[*]} in $((SECONDS - start)) s: $bin_dir"
echo "$bin_dir"

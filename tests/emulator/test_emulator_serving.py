"""The emulator over real sockets: uvicorn in process, and the command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.workers.emulator import cli, server, timing
from tandem.workers.emulator.scheduling import SchedulerConfig


def _gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise KeyError(name)


async def _until_idle(client: httpx.AsyncClient, base: str) -> None:
    deadline = time.monotonic() + 3
    while True:
        text = (await client.get(f"{base}/metrics")).text
        if (
            _gauge(text, "vllm:num_requests_running") == 0
            and _gauge(text, "vllm:kv_cache_usage_perc") == 0
        ):
            return
        assert time.monotonic() < deadline, "the aborted request still holds the engine"
        await asyncio.sleep(0.02)


async def test_streaming_over_uvicorn_and_a_disconnect_aborts_the_request() -> None:
    # Llama 8B on an H100 at real speed: 2000 tokens would take ~13 s.
    async with server.serving(server.EmulatorSettings()) as base, httpx.AsyncClient() as client:
        request = {"prompt": "hi", "max_tokens": 2000, "stream": True}
        async with client.stream("POST", f"{base}/v1/completions", json=request) as response:
            assert response.status_code == 200
            lines = []
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    break
        assert all(line.startswith("data: {") for line in lines)
        assert json.loads(lines[0][len("data: ") :])["choices"][0]["text"].startswith("tok")
        await _until_idle(client, base)


async def test_a_disconnect_during_a_json_request_aborts_it() -> None:
    async with server.serving(server.EmulatorSettings()) as base, httpx.AsyncClient() as client:
        call = asyncio.ensure_future(
            client.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2000})
        )
        await asyncio.sleep(0.2)
        text = (await client.get(f"{base}/metrics")).text
        assert _gauge(text, "vllm:num_requests_running") == 1
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        await _until_idle(client, base)


async def test_time_scale_speeds_the_engine_up() -> None:
    settings = server.EmulatorSettings(time_scale=50.0, scheduler=SchedulerConfig())
    async with server.serving(settings) as base, httpx.AsyncClient() as client:
        start = time.monotonic()
        r = await client.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 300})
        wall = time.monotonic() - start
        assert r.status_code == 200
        emulated = _gauge(
            (await client.get(f"{base}/metrics")).text, "vllm:e2e_request_latency_seconds_sum"
        )
    assert emulated > 300 * timing.decode_step_time(timing.LLAMA_3_1_8B, timing.H100, [1]) * 0.99
    assert wall < emulated / 5


def test_command_line_flags_become_settings() -> None:
    inv = cli.parse(
        [
            "--port", "9001", "--role", "prefill", "--served-model-name", "m", "--gpu", "H200",
            "--model-shape", "tiny", "--mbu", "0.8", "--max-num-seqs", "7",
            "--max-num-batched-tokens", "512", "--num-gpu-blocks-override", "99",
            "--kv-link-bandwidth", "50", "--time-scale", "10", "--engine-id", "E", "--kv-port", "5700",
        ]
    )  # fmt: skip
    s = inv.settings
    assert (inv.host, inv.port) == ("127.0.0.1", 9001)
    assert (s.role, s.model_name, s.time_scale, s.engine_id, s.kv_port) == (
        "prefill",
        "m",
        10.0,
        "E",
        5700,
    )
    cfg = s.scheduler
    assert cfg.gpu.name == "H200"
    assert cfg.gpu.mbu == 0.8
    assert cfg.shape is timing.TINY
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.total_blocks) == (7, 512, 99)
    assert cfg.kv_link_bandwidth == 50e9
    with pytest.raises(SystemExit):
        cli.parse(["--mfu", "2"])
    with pytest.raises(SystemExit):
        cli.parse(["--role", "router"])


def test_python_dash_m_serves_until_terminated() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tandem.workers.emulator",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60  # a loaded 2-core machine imports slowly
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    json={"prompt": "hello", "max_tokens": 2},
                    timeout=2,
                )
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.1)
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 2
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
    # uvicorn shuts down cleanly, then re-raises SIGTERM so the exit status tells it.
    assert process.returncode in (0, -signal.SIGTERM)
    assert b"Traceback" not in errors

"""The router over real sockets, in front of real emulator servers (vLLM's API,
kv_transfer_params, streaming): framing, the two hops, retries, fallback, 429,
disconnects, and a decode worker killed mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.router import server as router_server
from tandem.router import settings
from tandem.workers.emulator import server as emulator

from . import processes

MODEL = "tiny"


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += float(sample.value)
    return total


def _dead_url() -> str:
    """A 127.0.0.1 port nobody listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextlib.asynccontextmanager
async def _emulator(role: emulator.Role) -> AsyncIterator[str]:
    async with emulator.serving(emulator.EmulatorSettings(model_name=MODEL, role=role)) as url:
        yield url


@contextlib.asynccontextmanager
async def _router(prefill: list[str], decode: list[str], **extra: Any) -> AsyncIterator[str]:
    extra.setdefault("scrape", {"enabled": False})
    config = settings.static_settings(MODEL, prefill=prefill, decode=decode, **extra)
    async with router_server.serving(config) as (url, _):
        yield url


async def _events(response: httpx.Response, limit: int | None = None) -> list[str]:
    """SSE events as sent (each must end with a blank line)."""
    events: list[str] = []
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            events.append(event.decode())
            if limit is not None and len(events) >= limit:
                return events
    assert buffer == b"", "the stream ended in the middle of an event"
    return events


async def test_disaggregated_stream_and_json_over_two_hops() -> None:
    async with (
        _emulator("prefill") as p,
        _emulator("decode") as d,
        _router([p], [d]) as router,
        httpx.AsyncClient(timeout=10) as client,
    ):
        body = {"model": MODEL, "prompt": "hello " * 50, "max_tokens": 8, "stream": True}
        async with client.stream("POST", f"{router}/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = await _events(response)
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert len(chunks) == 8
        assert all(c["object"] == "text_completion" for c in chunks)

        chat = {"messages": [{"role": "user", "content": "hi there"}], "max_completion_tokens": 4}
        r = await client.post(f"{router}/v1/chat/completions", json=chat)
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 4

        decode_metrics = (await client.get(f"{d}/metrics")).text
        prefill_metrics = (await client.get(f"{p}/metrics")).text
        assert (
            _sample(
                decode_metrics, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"
            )
            > 0
        )
        assert _sample(prefill_metrics, "vllm:request_success_total") == 2
        router_metrics = (await client.get(f"{router}/metrics")).text
        assert _sample(router_metrics, "tandem_router_routed_total", path="disaggregated") == 2
        assert _sample(router_metrics, "tandem_router_ttft_seconds_count") == 1


async def test_slo_attainment_of_streams_through_the_emulator() -> None:
    # No real TTFT is under a microsecond, and every TPOT is under a minute.
    slo = {"ttft": 1e-6, "tpot": 60.0, "percentile": 99, "window": 60}
    async with (
        _emulator("prefill") as p,
        _emulator("decode") as d,
        _router([p], [d], slo=slo) as router,
        httpx.AsyncClient(timeout=10) as client,
    ):
        body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 4, "stream": True}
        for _ in range(3):
            async with client.stream("POST", f"{router}/v1/completions", json=body) as response:
                assert (await _events(response))[-1] == "data: [DONE]"
        text = (await client.get(f"{router}/metrics")).text
    assert _sample(text, "tandem_router_slo_requests", pool=MODEL) == 3
    assert _sample(text, "tandem_router_slo_attainment", objective="ttft") == 0.0
    assert _sample(text, "tandem_router_slo_attainment", objective="tpot") == 1.0
    assert _sample(text, "tandem_router_slo_attainment", objective="both") == 0.0
    assert _sample(text, "tandem_router_slo_target") == 0.99


async def test_dead_workers_are_retried_then_prefill_falls_back() -> None:
    dead_p, dead_d = _dead_url(), _dead_url()
    async with (
        _emulator("prefill") as p,
        _emulator("decode") as d,
        _router([dead_p, p], [dead_d, d], policy="round-robin") as router,
        httpx.AsyncClient(timeout=10) as client,
    ):
        for stream in (True, False, True, False):
            body = {"prompt": "hello", "max_tokens": 3, "stream": stream}
            r = await client.post(f"{router}/v1/completions", json=body)
            assert r.status_code == 200
        text = (await client.get(f"{router}/metrics")).text
        assert _sample(text, "tandem_router_retries_total", role="prefill") >= 1
        assert _sample(text, "tandem_router_retries_total", role="decode") >= 1
        assert _sample(text, "tandem_router_routed_total", path="disaggregated") == 4
        assert _sample(text, "tandem_router_requests_total", outcome="ok") == 4

    async with (
        _emulator("decode") as d,
        _router([_dead_url()], [d]) as router,
        httpx.AsyncClient(timeout=10) as client,
    ):
        r = await client.post(f"{router}/v1/completions", json={"prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200
        text = (await client.get(f"{router}/metrics")).text
        assert _sample(text, "tandem_router_fallbacks_total", reason="prefill_failed") == 1
        decode_metrics = (await client.get(f"{d}/metrics")).text
        assert (
            _sample(
                decode_metrics, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"
            )
            == 0
        )
        assert (
            _sample(decode_metrics, "vllm:prompt_tokens_by_source_total", source="local_compute")
            > 0
        )


async def test_full_queue_is_429_and_a_disconnect_aborts_upstream() -> None:
    async with (
        _emulator("aggregated") as d,
        _router(
            [], [d], mode="aggregated", max_in_flight_per_endpoint=1, max_queued_requests=0
        ) as router,
        httpx.AsyncClient(timeout=10) as client,
    ):
        long = {"prompt": "hi", "max_tokens": 2000, "stream": True}  # ~13 s of emulated H100
        async with client.stream("POST", f"{router}/v1/completions", json=long) as response:
            assert len(await _events(response, limit=2)) == 2
            r = await client.post(f"{router}/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        # The client left: the router must close its upstream request, the engine abort it.
        deadline = time.monotonic() + 3
        while True:
            text = (await client.get(f"{d}/metrics")).text
            if _sample(text, "vllm:num_requests_running") == 0:
                break
            assert time.monotonic() < deadline, "the decode worker still runs the abandoned request"
            await asyncio.sleep(0.02)
        for _ in range(100):
            text = (await client.get(f"{router}/metrics")).text
            if _sample(text, "tandem_router_requests_total", outcome="cancelled") == 1:
                break
            await asyncio.sleep(0.02)
        assert _sample(text, "tandem_router_requests_total", outcome="cancelled") == 1
        r = await client.post(f"{router}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200  # its slot is free again


@pytest.fixture
def decode_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A decode emulator in its own process, so a test can kill it."""
    with processes.decode_emulator(MODEL) as running:
        yield running


async def test_decode_killed_mid_stream_ends_with_an_error_event(decode_process: Any) -> None:
    d, process = decode_process
    async with (
        _emulator("prefill") as p,
        _router([p], [d]) as router,
        httpx.AsyncClient(timeout=10) as client,
    ):
        body = {"prompt": "hello", "max_tokens": 2000, "stream": True}
        async with client.stream("POST", f"{router}/v1/completions", json=body) as response:
            assert response.status_code == 200
            events: list[str] = []
            buffer = b""
            started = None
            async for chunk in response.aiter_raw():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    events.append(event.decode())
                if len(events) >= 3 and started is None:
                    os.kill(process.pid, signal.SIGKILL)
                    started = time.monotonic()
            assert buffer == b""
        assert started is not None
        assert time.monotonic() - started < 5
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "upstream_error"
        assert set(error) == {"message", "type", "param", "code"}
        text = (await client.get(f"{router}/metrics")).text
        assert _sample(text, "tandem_router_requests_total", outcome="broken_stream") == 1

"""The ASGI app end to end over mocked workers (httpx.MockTransport): no sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tandem.router import app as router_app
from tandem.router import settings

from .fakes import KV, Workers

P1, P2 = "http://p1:8000", "http://p2:8000"
D1, D2 = "http://d1:8000", "http://d2:8000"
MODEL = "m"
LONG = "word " * 400  # ~500 estimated tokens


def _config(**extra: Any) -> settings.RouterSettings:
    extra.setdefault("scrape", {"enabled": False})
    extra.setdefault("prefill", [P1, P2])
    extra.setdefault("decode", [D1, D2])
    prefill, decode = extra.pop("prefill"), extra.pop("decode")
    return settings.static_settings(MODEL, prefill=prefill, decode=decode, **extra)


@asynccontextmanager
async def _router(
    workers: Workers, **extra: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, router_app.RouterApp]]:
    app = router_app.create_app(_config(**extra), transport=workers.transport())
    async with app.running():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield client, app


def _metric(app: router_app.RouterApp, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, {"pool": MODEL, **labels})
    return value or 0.0


async def test_disaggregated_two_hops() -> None:
    workers = Workers()
    async with _router(workers) as (client, app):
        r = await client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hi", "max_tokens": 5},
            headers={"x-request-id": "abc"},
        )
    assert r.status_code == 200
    assert r.json()["remote"] is True
    assert r.headers["x-request-id"] == "abc"
    (prefill_url, prefill, prefill_headers), (decode_url, decode, decode_headers) = workers.seen
    assert prefill_url.endswith("/v1/completions")
    assert prefill_url.startswith("http://p")
    assert prefill["kv_transfer_params"]["do_remote_decode"] is True
    assert prefill["max_tokens"] == 1
    assert prefill["stream"] is False
    assert decode_url.startswith("http://d")
    assert decode == {"model": MODEL, "prompt": "hi", "max_tokens": 5, "kv_transfer_params": KV}
    assert prefill_headers["x-request-id"] == decode_headers["x-request-id"]
    assert prefill_headers["x-request-id"].startswith("abc-")
    assert _metric(app, "tandem_router_requests_total", outcome="ok") == 1
    assert _metric(app, "tandem_router_routed_total", path="disaggregated") == 1
    assert _metric(app, "tandem_router_prefill_hop_seconds_count") == 1


async def test_streamed_chat_passes_sse_through() -> None:
    workers = Workers()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with _router(workers) as (client, app):
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]] == ["Hel", "lo", "!"]
    prefill = workers.bodies("p")[0]
    assert prefill["max_completion_tokens"] == 1
    assert prefill["stream"] is False
    assert workers.bodies("d")[0]["stream"] is True
    assert _metric(app, "tandem_router_ttft_seconds_count") == 1
    assert _metric(app, "tandem_router_tpot_seconds_count") == 1


async def test_aggregated_mode_sends_the_clients_bytes_to_decode() -> None:
    workers = Workers()
    raw = b'{"prompt": "hi",   "max_tokens": 2}'
    async with _router(workers, mode="aggregated", prefill=[]) as (client, app):
        r = await client.post("/v1/completions", content=raw)
    assert r.status_code == 200
    assert next(url for url, _, _ in workers.seen).startswith("http://d")
    assert len(workers.seen) == 1
    assert _metric(app, "tandem_router_routed_total", path="aggregated") == 1


async def test_auto_mode_skips_prefill_for_short_prompts() -> None:
    workers = Workers()
    async with _router(workers, mode="auto", auto_threshold_tokens=100) as (client, app):
        await client.post("/v1/completions", json={"prompt": "short"})
        await client.post("/v1/completions", json={"prompt": LONG})
    assert len(workers.bodies("p")) == 1
    short, long = workers.bodies("d")
    assert "kv_transfer_params" not in short
    assert long["kv_transfer_params"] == KV
    assert _metric(app, "tandem_router_routed_total", path="short_prompt") == 1


async def test_prefill_failure_retries_then_falls_back_to_local_prefill() -> None:
    workers = Workers(
        behaviour={P1: lambda r, b: httpx.Response(500), P2: lambda r, b: httpx.Response(503)}
    )
    async with _router(workers) as (client, app):
        r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200
    assert {url.split("/v1")[0] for url, _, _ in workers.seen[:2]} == {P1, P2}
    assert "kv_transfer_params" not in workers.bodies("d")[0]
    assert _metric(app, "tandem_router_retries_total", role="prefill") == 1
    assert _metric(app, "tandem_router_fallbacks_total", reason="prefill_failed") == 1


async def test_prefill_retry_succeeds_on_another_worker() -> None:
    def refuse(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    workers = Workers(behaviour={P1: refuse})
    async with _router(workers, policy="round-robin") as (client, app):
        for _ in range(3):
            r = await client.post("/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 200
    assert all(b["kv_transfer_params"] == KV for b in workers.bodies("d"))
    assert len(workers.bodies("p1")) == 1  # then cooled down: not tried again
    assert _metric(app, "tandem_router_upstream_errors_total", role="prefill") == 1


async def test_prefill_timeout_falls_back() -> None:
    async def slow(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(500)

    workers = Workers(behaviour={P1: slow})
    async with _router(workers, prefill=[P1], timeouts={"prefill": 0.05}) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200
    assert "kv_transfer_params" not in workers.bodies("d")[0]


async def test_no_prefill_worker_falls_back() -> None:
    workers = Workers()
    async with _router(workers, prefill=[]) as (client, app):
        r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200
    assert _metric(app, "tandem_router_fallbacks_total", reason="no_prefill_worker") == 1


async def test_prefill_without_kv_params_falls_back() -> None:
    workers = Workers(behaviour={P1: lambda r, b: httpx.Response(200, json={"choices": []})})
    async with _router(workers, prefill=[P1]) as (client, app):
        r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200
    assert _metric(app, "tandem_router_fallbacks_total", reason="no_kv_params") == 1


async def test_a_workers_4xx_reaches_the_client_unchanged() -> None:
    error = {
        "error": {"message": "too long", "type": "BadRequestError", "param": "prompt", "code": 400}
    }
    workers = Workers(behaviour={P1: lambda r, b: httpx.Response(400, json=error)})
    async with _router(workers, prefill=[P1]) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400
    assert r.json() == error
    assert workers.bodies("d") == []


async def test_decode_failure_before_first_byte_retries_elsewhere() -> None:
    workers = Workers(behaviour={D1: lambda r, b: httpx.Response(502)})
    async with _router(workers, decode=[D1, D2], policy="round-robin") as (client, app):
        for stream in (False, True, False):
            r = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
            assert r.status_code == 200
    assert _metric(app, "tandem_router_retries_total", role="decode") >= 1


async def test_decode_failing_everywhere_is_a_502() -> None:
    workers = Workers(
        behaviour={D1: lambda r, b: httpx.Response(500), D2: lambda r, b: httpx.Response(500)}
    )
    async with _router(workers) as (client, app):
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "upstream_error"
    assert _metric(app, "tandem_router_requests_total", outcome="upstream_error") == 1


async def test_decode_first_byte_timeout_retries() -> None:
    async def silent(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(500)

    workers = Workers(behaviour={D1: silent})
    async with _router(
        workers, decode=[D1, D2], policy="round-robin", timeouts={"firstByte": 0.05}
    ) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        assert r.status_code == 200
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        assert r.status_code == 200


async def test_stream_broken_after_first_byte_ends_with_an_error_event() -> None:
    workers = Workers(fail_stream_after=2)
    async with _router(workers) as (client, app):
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 4
    assert json.loads(events[2][6:])["error"]["type"] == "upstream_error"
    assert events[3] == "data: [DONE]"
    assert _metric(app, "tandem_router_requests_total", outcome="broken_stream") == 1


async def test_stalled_stream_ends_with_an_error_event() -> None:
    workers = Workers(hold=asyncio.Event())
    async with _router(workers, timeouts={"idle": 0.05}) as (client, _app):
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[1][6:])["error"]["code"] == "upstream_timeout"
    assert events[-1] == "data: [DONE]"


async def test_client_disconnect_cancels_the_upstream_stream() -> None:
    workers = Workers(hold=asyncio.Event())
    app = router_app.create_app(_config(), transport=workers.transport())
    sent: list[dict[str, Any]] = []
    disconnect = asyncio.Event()
    body = json.dumps({"prompt": "hi", "stream": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body"):
            disconnect.set()  # the client leaves after the first chunk

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    async with app.running():
        await asyncio.wait_for(app(scope, receive, send), 5)
        assert workers.closed == [True]  # the upstream stream was closed
        assert (
            app.metrics.registry.get_sample_value(
                "tandem_router_requests_total", {"pool": MODEL, "outcome": "cancelled"}
            )
            == 1
        )
        assert app._runtime is not None
        assert app._runtime.sets["decode"].total_in_flight() == 0
        assert app._runtime.admission.active == 0


async def test_queue_full_is_a_429_with_retry_after() -> None:
    workers = Workers(hold=asyncio.Event())
    async with _router(
        workers,
        decode=[D1],
        max_in_flight_per_endpoint=1,
        max_queued_requests=0,
        retry_after_seconds=3,
    ) as (client, app):
        first = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        )
        for _ in range(100):
            if workers.bodies("d"):
                break
            await asyncio.sleep(0.01)
        r = await client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "queue_full"
        assert workers.hold is not None
        workers.hold.set()
        assert (await first).status_code == 200
        assert _metric(app, "tandem_router_requests_total", outcome="rejected") == 1


async def test_queued_request_waits_for_a_slot() -> None:
    workers = Workers(hold=asyncio.Event())
    async with _router(
        workers, decode=[D1], max_in_flight_per_endpoint=1, max_queued_requests=4
    ) as (client, app):
        first = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        )
        second = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        )
        for _ in range(100):
            if (
                app.metrics.registry.get_sample_value(
                    "tandem_router_queued_requests", {"pool": MODEL}
                )
                == 1
            ):
                break
            await asyncio.sleep(0.01)
        assert len(workers.bodies("d")) == 1
        assert workers.hold is not None
        workers.hold.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200
        assert _metric(app, "tandem_router_queue_wait_seconds_count") == 1


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "code"),
    [
        ("POST", "/v1/completions", b"{bad json", 400, "invalid_json"),
        ("POST", "/v1/completions", b'{"model": "x", "prompt": "p"}', 404, "model_not_found"),
        ("GET", "/v1/completions", b"", 405, "method_not_allowed"),
        ("POST", "/v1/embeddings", b"{}", 405, "method_not_allowed"),
        ("GET", "/nowhere", b"", 404, "not_found"),
        (
            "POST",
            "/v1/completions",
            b'{"prompt": "' + b"x" * 2000 + b'"}',
            413,
            "payload_too_large",
        ),
    ],
)
async def test_client_errors_are_openai_shaped(
    method: str, path: str, content: bytes, status: int, code: str
) -> None:
    async with _router(Workers(), limits={"maxBodyBytes": 1024}) as (client, _app):
        r = await client.request(method, path, content=content)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}


async def test_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    auth = {"apiKeyEnv": "TANDEM_TEST_KEYS"}
    async with _router(Workers(), auth=auth) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 200  # no keys in the environment: open
    monkeypatch.setenv("TANDEM_TEST_KEYS", "k1,k2")
    async with _router(Workers(), auth=auth) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        bad = {"authorization": "Bearer nope"}
        r = await client.post("/v1/completions", json={"prompt": "hi"}, headers=bad)
        assert r.status_code == 401
        good = {"authorization": "Bearer k2"}
        r = await client.post("/v1/completions", json={"prompt": "hi"}, headers=good)
        assert r.status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/v1/models", headers=good)).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200


async def test_models_health_ready_metrics() -> None:
    async with _router(Workers()) as (client, app):
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/ready")).status_code == 200
        text = (await client.get("/metrics")).text
        assert 'tandem_router_endpoints{pool="m",role="decode"} 2.0' in text
        assert (
            'tandem_router_in_flight_requests{endpoint="http://d1:8000",pool="m",role="decode"} 0.0'
            in text
        )
        app.set_endpoints("decode", [])
        assert (await client.get("/ready")).status_code == 503


async def test_not_running_is_503() -> None:
    app = router_app.create_app(_config())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://r"
    ) as client:
        assert (await client.post("/v1/completions", json={"prompt": "x"})).status_code == 503
        assert (await client.get("/ready")).status_code == 503
        assert (await client.get("/health")).status_code == 200
    with pytest.raises(RuntimeError):
        app.set_endpoints("decode", [])


async def test_set_endpoints_changes_where_requests_go() -> None:
    workers = Workers()
    async with _router(workers, mode="aggregated", prefill=[], decode=[D1]) as (client, app):
        app.set_endpoints("decode", [D2])
        await client.post("/v1/completions", json={"prompt": "hi"})
    assert workers.seen[0][0].startswith(D2)


async def test_metrics_md_lists_every_metric() -> None:
    """router/METRICS.md is the table the README folds in: it must not drift."""
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    documented = set(
        re.findall(
            r"`(tandem_router_\w+)`", (Path(router_app.__file__).parent / "METRICS.md").read_text()
        )
    )
    async with _router(Workers(), slo={"ttft": 1.0, "tpot": 0.1}) as (client, _):
        await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        text = (await client.get("/metrics")).text
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")  # prometheus_client's creation stamps
    }
    assert exposed == documented


async def test_request_ids_are_unique_upstream_and_echoed() -> None:
    workers = Workers()
    async with _router(workers, mode="aggregated", prefill=[]) as (client, _):
        for _ in range(2):
            r = await client.post(
                "/v1/completions", json={"prompt": "hi"}, headers={"x-request-id": "same"}
            )
            assert r.headers["x-request-id"] == "same"
        r = await client.post(
            "/v1/completions", json={"prompt": "hi"}, headers={"x-request-id": "bad id"}
        )
        assert r.headers["x-request-id"] != "bad id"
        r = await client.post("/v1/completions", json={"prompt": "hi"})
        generated = r.headers["x-request-id"]
    upstream = [headers["x-request-id"] for _, _, headers in workers.seen]
    assert upstream[0] != upstream[1]
    assert upstream[0].startswith("same-")
    assert upstream[3] == generated

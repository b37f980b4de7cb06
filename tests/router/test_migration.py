"""Decode migration: a stream whose decode worker dies mid-way goes on elsewhere.

The workers are emulators (vLLM's API with ``return_token_ids``, tokens a function
of the whole context, so a continuation from prompt ids + generated ids goes on with
the same tokens) behind httpx.MockTransport, on virtual time; a worker "dies" by
cutting its stream after some events (connection reset) or sending vLLM's error
event. The last test kills a real emulator process mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tandem.router import app as router_app
from tandem.router import migration, payloads, settings, tokens
from tandem.router import server as router_server
from tandem.workers.emulator import engine
from tandem.workers.emulator import server as emulator

from . import processes

P1 = "http://p1:8000"
D1, D2, D3 = "http://d1:8000", "http://d2:8000", "http://d3:8000"
MODEL = "m"
PROMPT = "The router moves a broken stream to another decode worker."


@dataclass
class Fault:
    after: int
    """Events sent before the fault."""
    kind: str = "reset"
    """``reset`` (the connection breaks), ``error`` (vLLM's 500 error event, then
    ``[DONE]``), ``stall`` (nothing more)."""


@dataclass
class Pool:
    """Emulator workers by base URL, reached through httpx.MockTransport."""

    clients: dict[str, httpx.AsyncClient]
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    """Per worker, the faults of its next streams (one per stream, in order)."""
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def bodies(self, base: str) -> list[dict[str, Any]]:
        return [body for url, body in self.seen if url.startswith(base)]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        client = self.clients[base]
        if request.method == "GET":
            r = await client.get(request.url.path)
            return httpx.Response(r.status_code, content=r.content, headers=r.headers)
        body = json.loads(request.content)
        self.seen.append((str(request.url), body))
        r = await client.post(request.url.path, content=request.content)
        if r.status_code != 200 or not body.get("stream"):
            return httpx.Response(r.status_code, content=r.content, headers=r.headers)
        events = [e + b"\n\n" for e in r.content.split(b"\n\n") if e]
        faults = self.faults.get(base)
        fault = faults.pop(0) if faults else None
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream; charset=utf-8"},
            content=_cut(events, fault),
        )


async def _cut(events: list[bytes], fault: Fault | None) -> AsyncIterator[bytes]:
    for i, event in enumerate(events):
        if fault is not None and i == fault.after:
            if fault.kind == "reset":
                raise httpx.ReadError("connection reset by peer")
            if fault.kind == "error":
                error = {"message": "EngineCore died", "type": "InternalServerError"}
                yield b"data: " + json.dumps({"error": {**error, "code": 500}}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                return
            await _forever()
        yield event


async def _forever() -> None:
    await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def _pool(*urls: str) -> AsyncIterator[Pool]:
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for url in urls:
            role: emulator.Role = "prefill" if url.startswith("http://p") else "decode"
            config = emulator.EmulatorSettings(model_name=MODEL, role=role, max_model_len=4096)
            clients[url] = await stack.enter_async_context(
                emulator.in_process(config, clock=engine.VirtualClock())
            )
        yield Pool(clients)


@contextlib.asynccontextmanager
async def _router(
    pool: Pool, decode: list[str], **extra: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, router_app.RouterApp]]:
    extra.setdefault("scrape", {"enabled": False})
    extra.setdefault("policy", "round-robin")
    config = settings.static_settings(MODEL, prefill=[P1], decode=decode, **extra)
    app = router_app.create_app(config, transport=pool.transport())
    async with app.running():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield client, app


def _metric(app: router_app.RouterApp, name: str, **labels: str) -> float:
    value = app.metrics.registry.get_sample_value(name, {"pool": MODEL, **labels})
    return value or 0.0


def _chunks(text: str) -> list[dict[str, Any]]:
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


async def _reference(pool: Pool, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The same request, streamed by one healthy decode emulator from start to end."""
    r = await pool.clients[D3].post(path, json=body)
    assert r.status_code == 200
    return _chunks(r.text)


def _text(chunks: list[dict[str, Any]]) -> str:
    out = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


COMPLETION = {
    "model": MODEL,
    "prompt": PROMPT,
    "max_tokens": 40,
    "stream": True,
    "stream_options": {"include_usage": True},
}
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": PROMPT}],
    "max_tokens": 30,
    "stream": True,
    "stream_options": {"include_usage": True},
}


# -- one worker dies, the stream goes on -------------------------------------------


async def test_a_completion_stream_moves_when_its_decode_worker_dies() -> None:
    async with _pool(P1, D1, D2, D3) as pool:
        pool.faults[D2] = [Fault(after=5)]  # round-robin: the first request goes to D2
        want = await _reference(pool, "/v1/completions", COMPLETION)
        async with _router(pool, [D1, D2]) as (client, app):
            r = await client.post("/v1/completions", json=COMPLETION)
            assert r.status_code == 200
            chunks = _chunks(r.text)
            assert _metric(app, "tandem_router_migrations_total", outcome="ok") == 1
            assert _metric(app, "tandem_router_requests_total", outcome="ok") == 1
            assert _metric(app, "tandem_router_upstream_errors_total", role="decode") == 1
    assert _text(chunks) == _text(want)
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    token_chunks = [c for c in chunks if c["choices"]]
    assert len(token_chunks) == 40
    # The ids the router asked for are not the client's: null, as vLLM writes them.
    assert all(c["choices"][0]["token_ids"] is None for c in token_chunks)
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in token_chunks)
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {**want[-1]["usage"]}
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    # The continuation: prompt ids + the 5 ids sent, 35 tokens left, no second prefill.
    first, second = pool.bodies(D2)[0], pool.bodies(D1)[0]
    assert first["return_token_ids"] is True
    assert "kv_transfer_params" in first
    assert "kv_transfer_params" not in second
    assert second["max_tokens"] == 35
    assert len(second["prompt"]) == want[-1]["usage"]["prompt_tokens"] + 5
    assert len(pool.bodies(P1)) == 1


async def test_a_chat_stream_moves_and_stays_a_chat() -> None:
    async with _pool(P1, D1, D2, D3) as pool:
        pool.faults[D2] = [Fault(after=4)]  # the role chunk and 3 tokens
        want = await _reference(pool, "/v1/chat/completions", CHAT)
        async with _router(pool, [D1, D2]) as (client, app):
            r = await client.post("/v1/chat/completions", json=CHAT)
            chunks = _chunks(r.text)
            assert _metric(app, "tandem_router_migrations_total", outcome="ok") == 1
    assert _text(chunks) == _text(want)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1
    assert chunks[0]["prompt_token_ids"] is None
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length"
    assert finish.count("length") == 1
    assert chunks[-1]["usage"] == want[-1]["usage"]
    continuation = pool.bodies(D1)[0]
    assert "messages" not in continuation
    assert continuation["max_tokens"] == 27


async def test_a_client_asking_for_token_ids_keeps_them() -> None:
    body = {**COMPLETION, "return_token_ids": True}
    async with _pool(P1, D1, D2, D3) as pool:
        pool.faults[D2] = [Fault(after=3)]
        want = await _reference(pool, "/v1/completions", body)
        async with _router(pool, [D1, D2]) as (client, _):
            chunks = _chunks((await client.post("/v1/completions", json=body)).text)
    ids = [t for c in chunks for choice in c["choices"] for t in choice["token_ids"]]
    assert ids == [t for c in want for choice in c["choices"] for t in choice["token_ids"]]
    prompts = [ch["prompt_token_ids"] for c in chunks for ch in c["choices"]]
    assert prompts[0] == want[0]["choices"][0]["prompt_token_ids"]
    assert prompts[1:] == [None] * (len(prompts) - 1)


async def test_an_error_event_of_the_worker_moves_the_stream() -> None:
    async with _pool(P1, D1, D2, D3) as pool:
        pool.faults[D2] = [Fault(after=7, kind="error")]
        want = await _reference(pool, "/v1/completions", COMPLETION)
        async with _router(pool, [D1, D2]) as (client, app):
            chunks = _chunks((await client.post("/v1/completions", json=COMPLETION)).text)
            assert _metric(app, "tandem_router_migrations_total", outcome="ok") == 1
    assert not [c for c in chunks if "error" in c]
    assert _text(chunks) == _text(want)


async def test_a_stalled_stream_moves() -> None:
    async with _pool(P1, D1, D2, D3) as pool:
        pool.faults[D2] = [Fault(after=2, kind="stall")]
        want = await _reference(pool, "/v1/completions", COMPLETION)
        async with _router(pool, [D1, D2], timeouts={"idle": 0.2}) as (client, app):
            chunks = _chunks((await client.post("/v1/completions", json=COMPLETION)).text)
            assert _metric(app, "tandem_router_migrations_total", outcome="ok") == 1
    assert _text(chunks) == _text(want)


async def test_a_stream_moves_more_than_once() -> None:
    async with _pool(P1, D1, D2, D3) as pool:
        pool.faults[D2] = [Fault(after=5)]
        pool.faults[D1] = [Fault(after=10)]
        want = await _reference(pool, "/v1/completions", COMPLETION)
        async with _router(pool, [D1, D2, D3]) as (client, app):
            chunks = _chunks((await client.post("/v1/completions", json=COMPLETION)).text)
            assert _metric(app, "tandem_router_migrations_total", outcome="ok") == 2
    assert _text(chunks) == _text(want)
    assert chunks[-1]["usage"] == want[-1]["usage"]


# -- when it cannot move: today's clean error event ------------------------------


async def test_migration_off_ends_with_an_error_event() -> None:
    async with _pool(P1, D1, D2) as pool:
        pool.faults[D2] = [Fault(after=5)]
        async with _router(pool, [D1, D2], migrationLimit=0) as (client, app):
            r = await client.post("/v1/completions", json=COMPLETION)
            events = [e for e in r.text.split("\n\n") if e]
            assert _metric(app, "tandem_router_requests_total", outcome="broken_stream") == 1
            assert _metric(app, "tandem_router_migrations_total") == 0
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["type"] == "upstream_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert len(events) == 5 + 2
    assert "return_token_ids" not in pool.bodies(D2)[0]  # passed through untouched
    assert pool.bodies(D1) == []


async def test_an_exhausted_limit_ends_with_an_error_event() -> None:
    async with _pool(P1, D1, D2, D3) as pool:
        pool.faults[D2] = [Fault(after=5)]
        pool.faults[D3] = [Fault(after=5)]
        async with _router(pool, [D1, D2, D3], migrationLimit=1, policy="least-load") as (
            client,
            app,
        ):
            pool.faults[D1] = [Fault(after=5)]  # whichever serves first, all die
            pool.faults[D2] = [Fault(after=5)]
            r = await client.post("/v1/completions", json=COMPLETION)
            events = [e for e in r.text.split("\n\n") if e]
            assert _metric(app, "tandem_router_migrations_total", outcome="ok") == 1
            assert _metric(app, "tandem_router_migrations_total", outcome="exhausted") == 1
            assert _metric(app, "tandem_router_requests_total", outcome="broken_stream") == 1
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "upstream_error"
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    assert len(chunks) == 10  # 5 from each worker, no repeats
    assert len({c["id"] for c in chunks}) == 1


async def test_no_other_decode_worker_ends_with_an_error_event() -> None:
    async with _pool(P1, D1) as pool:
        pool.faults[D1] = [Fault(after=5)]
        async with _router(pool, [D1]) as (client, app):
            r = await client.post("/v1/completions", json=COMPLETION)
            events = [e for e in r.text.split("\n\n") if e]
            assert _metric(app, "tandem_router_migrations_total", outcome="failed") == 1
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["type"] == "upstream_error"


async def test_a_stream_broken_after_its_last_token_just_ends() -> None:
    async with _pool(P1, D1, D2) as pool:
        pool.faults[D2] = [Fault(after=40)]  # every token sent, then no usage nor [DONE]
        async with _router(pool, [D1, D2]) as (client, app):
            chunks = _chunks((await client.post("/v1/completions", json=COMPLETION)).text)
            assert _metric(app, "tandem_router_migrations_total") == 0
            assert _metric(app, "tandem_router_requests_total", outcome="ok") == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    assert pool.bodies(D1) == []


# -- the pure parts ---------------------------------------------------------------


def _request(api: payloads.Api, body: dict[str, Any]) -> payloads.Request:
    config = settings.static_settings(MODEL, decode=[D1])
    return payloads.parse(api, json.dumps(body).encode(), config, tokens.load(None))


@pytest.mark.parametrize(
    ("api", "extra", "expected"),
    [
        ("completions", {}, True),
        ("completions", {"stream": False}, False),
        ("completions", {"n": 2}, False),
        ("completions", {"echo": True}, False),
        ("completions", {"prompt": ["a", "b"]}, False),
        ("completions", {"prompt": [1, 2, 3]}, True),
        ("chat", {}, True),
        ("chat", {"logprobs": True}, False),
        ("chat", {"tools": [{"type": "function"}]}, False),
        ("chat", {"response_format": {"type": "json_object"}}, False),
    ],
)
def test_movable(api: payloads.Api, extra: dict[str, Any], expected: bool) -> None:
    base = COMPLETION if api == "completions" else CHAT
    assert migration.movable(_request(api, {**base, **extra})) is expected


def test_a_chat_continuation_keeps_sampling_and_the_models_length() -> None:
    body = {**CHAT, "temperature": 0.5, "seed": 7, "stop": ["\n"], "min_tokens": 4}
    del body["max_tokens"]
    relay = migration.Relay.for_request(_request("chat", body))
    first = {"id": "c", "created": 1, "model": MODEL, "prompt_token_ids": [1, 2, 3]}
    role = {**first, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    token = {"id": "c", "created": 1, "model": MODEL, "choices": [{"index": 0}]}
    token["choices"][0].update(delta={"content": "a"}, token_ids=[9])
    data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in (role, token, token))
    out, verdict = relay.feed(data[:-7])  # a piece of an event stays buffered
    assert verdict == "more"
    assert out.count(b"data: ") == 2
    out, verdict = relay.feed(data[-7:])
    assert out.count(b"data: ") == 1
    assert relay.movable
    assert relay.generated == [9, 9]
    assert relay.left() is None
    new = json.loads(relay.continuation(100))
    assert new == {
        "model": MODEL,
        "temperature": 0.5,
        "seed": 7,
        "stop": ["\n"],
        "min_tokens": 2,
        "stream_options": {"include_usage": True},
        "stream": True,
        "return_token_ids": True,
        "prompt": [1, 2, 3, 9, 9],
        "max_tokens": 95,
    }


def test_chunks_without_token_ids_cannot_move() -> None:
    relay = migration.Relay.for_request(_request("completions", COMPLETION))
    chunk = {"id": "x", "created": 1, "model": MODEL, "choices": [{"index": 0, "text": "a"}]}
    out, _ = relay.feed(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    assert json.loads(out[6:]) == chunk
    assert not relay.movable


# -- a real process killed mid-stream --------------------------------------------


@pytest.fixture
def decode_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A decode emulator in its own process, so a test can kill it."""
    with processes.decode_emulator(MODEL) as running:
        yield running


async def test_a_killed_decode_process_mid_stream_is_continued_elsewhere(
    decode_process: tuple[str, subprocess.Popen[bytes]],
) -> None:
    doomed, process = decode_process
    body = {**COMPLETION, "max_tokens": 400}
    async with (
        emulator.serving(emulator.EmulatorSettings(model_name=MODEL, role="prefill")) as p,
        emulator.serving(emulator.EmulatorSettings(model_name=MODEL, role="decode")) as d,
        httpx.AsyncClient(timeout=30) as client,
    ):
        config = settings.static_settings(
            MODEL, prefill=[p], decode=[doomed], scrape={"enabled": False}
        )
        async with router_server.serving(config) as (router, app):
            reference = await client.post(f"{d}/v1/completions", json={**body, "stream": False})
            events: list[str] = []
            buffer = b""
            killed = False
            async with client.stream("POST", f"{router}/v1/completions", json=body) as response:
                async for chunk in response.aiter_raw():
                    buffer += chunk
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        events.append(event.decode())
                    if len(events) >= 3 and not killed:
                        app.set_endpoints("decode", [doomed, d])
                        os.kill(process.pid, signal.SIGKILL)
                        killed = True
            assert buffer == b""
            metrics = app.metrics
    assert killed
    chunks = _chunks("\n\n".join(events) + "\n\n")
    assert not [c for c in chunks if "error" in c]
    assert _text(chunks) == reference.json()["choices"][0]["text"]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["usage"] == reference.json()["usage"] | {"prompt_tokens_details": None}
    assert metrics.migrations["ok"]._value.get() == 1

"""A scriptable fake of vLLM workers behind httpx.MockTransport (no sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

KV = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_engine_id": "engine-p",
    "remote_block_ids": [1, 2, 3],
    "remote_host": "10.0.0.1",
    "remote_port": 5600,
}

Behaviour = Callable[[httpx.Request, dict[str, Any]], Awaitable[httpx.Response] | httpx.Response]


def sse(*events: dict[str, Any]) -> list[bytes]:
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def token(text: str) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


async def _chunks(
    parts: list[bytes], fail_after: int | None, gate: asyncio.Event | None, closed: list[bool]
) -> AsyncIterator[bytes]:
    try:
        for i, part in enumerate(parts):
            if fail_after is not None and i == fail_after:
                raise httpx.ReadError("connection reset by peer")
            if gate is not None and i == 1:
                await gate.wait()
            yield part
    finally:
        closed.append(True)


@dataclass
class Workers:
    """Answers like vLLM: prefill returns kv_transfer_params; decode streams or not.

    ``behaviour[url]`` overrides a worker (raise, delay, status...)."""

    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, Any], httpx.Headers]] = field(default_factory=list)
    tokens: tuple[str, ...] = ("Hel", "lo", "!")
    fail_stream_after: int | None = None
    hold: asyncio.Event | None = None
    """When set, streams wait on it after their first chunk."""
    closed: list[bool] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def bodies(self, host: str) -> list[dict[str, Any]]:
        return [body for url, body, _ in self.seen if url.startswith(f"http://{host}")]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.netloc.decode()}"
        if request.url.path == "/metrics":
            return httpx.Response(200, text="vllm:num_requests_waiting 0\n")
        body = json.loads(request.content)
        self.seen.append((str(request.url), body, request.headers))
        custom = self.behaviour.get(base)
        if custom is not None:
            result = custom(request, body)
            return await result if isinstance(result, Awaitable) else result
        return self.default(body)

    def default(self, body: dict[str, Any]) -> httpx.Response:
        kv = body.get("kv_transfer_params") or {}
        if kv.get("do_remote_decode"):
            assert body["max_tokens"] == 1
            assert body["stream"] is False
            return httpx.Response(
                200, json={"id": "p", "choices": [{"text": "H"}], "kv_transfer_params": KV}
            )
        if body.get("stream"):
            parts = sse(*(token(t) for t in self.tokens))
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream; charset=utf-8"},
                content=_chunks(parts, self.fail_stream_after, self.hold, self.closed),
            )
        return httpx.Response(
            200, json={"id": "d", "choices": [{"text": "".join(self.tokens)}], "remote": bool(kv)}
        )

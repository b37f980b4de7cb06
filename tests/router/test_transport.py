"""Http11Transport against a scripted HTTP/1.1 server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from tandem.router import transport

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]
"""Gets one request (head + body); writes an answer; returns whether to keep the connection."""

TIMEOUTS: dict[str, float | None] = {"connect": 2.0, "read": None}


@contextlib.asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if not await handler(head + body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", connections


def _json(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
        % (
            len(body),
            extra,
            body,
        )
    )


async def test_post_reuses_one_keep_alive_connection() -> None:
    seen: list[bytes] = []

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> bool:
        seen.append(request)
        writer.write(_json(b'{"ok": true}'))
        return True

    pool = transport.Http11Transport()
    async with _server(handler) as (url, connections):
        for i in range(3):
            reply = await pool.post(f"{url}/v1/completions", b'{"a": 1}', f"id{i}", TIMEOUTS)
            assert reply.status == 200
            assert reply.content_type == b"application/json"
            assert await reply.read() == b'{"ok": true}'
            await reply.aclose()
        assert len(connections) == 1
    await pool.aclose()
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"x-request-id: id0" in head
    assert b"content-type: application/json" in head
    assert body == b'{"a": 1}'


async def test_chunked_stream_coalesces_what_has_arrived() -> None:
    release = asyncio.Event()

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        writer.write(b"6\r\ndata 1\r\n6\r\ndata 2\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6;ext=1\r\ndata 3\r\n0\r\n\r\n")
        return True

    pool = transport.Http11Transport()
    async with _server(handler) as (url, connections):
        reply = await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)
        assert reply.content_type == b"text/event-stream"
        chunks = reply.chunks()
        first = await anext(chunks)
        while first != b"data 1data 2":  # both arrived together (almost always at once)
            first += await anext(chunks)
        release.set()
        assert [c async for c in chunks] == [b"data 3"]
        await reply.aclose()
        again = await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)
        release.set()
        assert await again.read() == b"data 1data 2data 3"
        await again.aclose()
        assert len(connections) == 1
    await pool.aclose()


async def test_close_delimited_body_and_connection_close() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        return False

    pool = transport.Http11Transport()
    async with _server(handler) as (url, connections):
        for _ in range(2):
            reply = await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)
            assert await reply.read() == b"until the end"
            await reply.aclose()
        assert len(connections) == 2
    await pool.aclose()


async def test_a_stale_pooled_connection_is_retried_on_a_fresh_one() -> None:
    count = 0

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> bool:
        nonlocal count
        count += 1
        writer.write(_json(b"{}"))
        return count != 1  # the first connection closes after its answer (keep-alive ends)

    pool = transport.Http11Transport()
    async with _server(handler) as (url, connections):
        reply = await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)
        await reply.read()
        await reply.aclose()
        await asyncio.sleep(0.05)  # the close reaches us: the pooled connection is unusable
        reply = await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)
        assert reply.status == 200
        await reply.aclose()
        assert len(connections) == 2
    await pool.aclose()


async def test_errors_are_httpx_errors() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    pool = transport.Http11Transport()
    with pytest.raises(httpx.ConnectError):
        await pool.post(f"{dead}/x", b"{}", "r", TIMEOUTS)

    async def broken(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return False  # then the connection drops mid-stream

    async with _server(broken) as (url, _):
        reply = await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in reply.chunks():
                pass
        await reply.aclose()

    async def garbage(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"SSH-2.0-nope\r\n\r\n")
        return False

    async with _server(garbage) as (url, _):
        with pytest.raises(httpx.RemoteProtocolError):
            await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)

    async def silent(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async with _server(silent) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            await pool.post(f"{url}/x", b"{}", "r", {"read": 0.05})
    await pool.aclose()


async def test_as_an_httpx_transport() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> bool:
        if request.startswith(b"GET /metrics"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nm 1\n")
        else:
            writer.write(_json(request.partition(b"\r\n\r\n")[2]))
        return True

    async with (
        _server(handler) as (url, connections),
        httpx.AsyncClient(transport=transport.Http11Transport()) as client,
    ):
        assert (await client.get(f"{url}/metrics", timeout=1)).text == "m 1\n"
        r = await client.post(f"{url}/echo", json={"x": 1})
        assert r.json() == {"x": 1}
        async with client.stream("POST", f"{url}/echo", content=b"[1]") as streamed:
            assert [c async for c in streamed.aiter_raw()] == [b"[1]"]
        assert len(connections) == 1


async def test_upstream_for_adapts_other_transports() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["x-request-id"] == "abc"
        return httpx.Response(201, headers={"content-type": "text/plain"}, content=b"made")

    upstream = transport.upstream_for(httpx.MockTransport(handler))
    assert isinstance(upstream, transport.HttpxUpstream)
    reply = await upstream.post("http://w/x", b"{}", "abc", TIMEOUTS)
    assert (reply.status, reply.content_type) == (201, b"text/plain")
    assert await reply.read() == b"made"
    await reply.aclose()
    ours = transport.Http11Transport()
    assert transport.upstream_for(ours) is ours


def test_under_uvloop() -> None:
    """The CLI runs on uvloop when installed: its transports are not asyncio's classes."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async def handler(request: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            )
            return True

        pool = transport.Http11Transport()
        async with _server(handler) as (url, _):
            for _ in range(2):
                reply = await pool.post(f"{url}/x", b"{}", "r", TIMEOUTS)
                assert await reply.read() == b"ok"
                await reply.aclose()
        await pool.aclose()

    uvloop.run(main())

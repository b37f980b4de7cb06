"""A lean HTTP/1.1 client for the router's worker traffic.

httpx's default transport (httpcore over anyio) costs about a millisecond of CPU
per request on these machines (a cancel scope and a checkpoint around every socket
operation, a scan of the pool per request), and ``httpx.AsyncClient.send`` adds
~0.3 ms more (URL parsing, auth, redirect and cookie machinery); the router's whole
budget is 1 ms. It only ever sends small JSON POSTs over plain HTTP/1.1 to workers
it trusts, so :class:`Http11Transport` does just that, on an ``asyncio.Protocol``:
one write per request, keep-alive connections pooled per host, ``content-length``,
chunked and read-until-close bodies, and httpx's exceptions.

Two faces over the same connections:

* :meth:`Http11Transport.post` — the hot path (no httpx objects): an
  :class:`Reply` whose chunks coalesce whatever the worker already sent;
* ``handle_async_request`` — an ordinary ``httpx.AsyncBaseTransport`` (the app's one
  ``httpx.AsyncClient`` uses it, e.g. for scraping).

:func:`upstream_for` gives the orchestrator an :class:`Upstream` for any transport:
this one as is, any other (``httpx.MockTransport`` in tests) through an adapter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

import httpx

__all__ = ["Http11Transport", "HttpxUpstream", "Reply", "Upstream", "upstream_for"]

_MAX_HEAD = 64 * 1024
_HIGH_WATER = 1 << 20


class Reply(Protocol):
    """A worker's answer: status and content type at once, the body as it comes."""

    status: int
    content_type: bytes

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def post(
        self, url: str, body: bytes, request_id: str, timeouts: dict[str, float | None]
    ) -> Reply: ...


# ---------------------------------------------------------------------------
# One connection


class _Connection(asyncio.Protocol):
    """A client connection: bytes in a buffer, one waiter at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # reading

    async def more(self) -> bool:
        """Wait for more bytes; False when the peer closed the connection."""
        if self.closed:
            return False
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None
        return bool(self.buffer) or not self.closed

    def take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    # state

    def usable(self, now: float, expiry: float) -> bool:
        return (
            not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
            and not self.buffer  # unsolicited bytes: something is off
            and now - self.idle_since < expiry
        )

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _StaleConnectionError(Exception):
    """The server closed a pooled connection before answering anything."""


async def _read_head(
    conn: _Connection, url: str
) -> tuple[int, list[tuple[bytes, bytes]], int | None, bool, bool]:
    """Status, headers, content-length, chunked, keep-alive."""
    while True:
        end = conn.buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(conn.buffer) > _MAX_HEAD:
            raise httpx.RemoteProtocolError(f"{url}: response head too large")
        if not await conn.more():
            if not conn.buffer:
                raise _StaleConnectionError
            raise httpx.RemoteProtocolError(f"{url}: connection closed in the response head")
    head = conn.take(end + 4)
    lines = head[:-4].split(b"\r\n")
    status_line = lines[0]
    if not status_line.startswith(b"HTTP/1."):
        raise httpx.RemoteProtocolError(f"{url}: not an HTTP/1.x response: {status_line[:40]!r}")
    try:
        status = int(status_line[9:12])
    except ValueError as exc:
        raise httpx.RemoteProtocolError(f"{url}: bad status line {status_line[:40]!r}") from exc
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    keep_alive = status_line[5:8] == b"1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip()
        value = value.strip()
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            with contextlib.suppress(ValueError):
                length = int(value)
        elif lower == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lower == b"connection":
            token = value.lower()
            if b"close" in token:
                keep_alive = False
            elif b"keep-alive" in token:
                keep_alive = True
    if chunked:
        length = None
    if status in (204, 304) or 100 <= status < 200:
        length, chunked = 0, False
    return status, headers, length, chunked, keep_alive


class _Reply:
    """An answer read off one pooled connection (implements :class:`Reply`)."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_done",
        "_keep_alive",
        "_key",
        "_left",
        "_pool",
        "_url",
        "content_type",
        "headers",
        "status",
    )

    def __init__(
        self,
        pool: Http11Transport,
        key: tuple[str, int],
        conn: _Connection,
        url: str,
        head: tuple[int, list[tuple[bytes, bytes]], int | None, bool, bool],
    ) -> None:
        self.status, self.headers, length, self._chunked, self._keep_alive = head
        self.content_type = b"application/json"
        for name, value in self.headers:
            if name.lower() == b"content-type":
                self.content_type = value
        self._pool = pool
        self._key = key
        self._conn: _Connection | None = conn
        self._url = url
        self._left = length
        self._done = length == 0
        if length is None and not self._chunked:
            self._keep_alive = False  # the body ends when the connection does

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, decoded from its framing; each piece is everything complete that
        had arrived (so a burst of events is one write downstream)."""
        conn = self._conn
        if conn is None or self._done:
            return
        if self._chunked:
            while True:
                out, finished = self._parse_chunks(conn)
                if out:
                    yield out
                if finished:
                    self._done = True
                    return
                if not await conn.more():
                    raise httpx.RemoteProtocolError(
                        f"{self._url}: peer closed the connection mid-stream"
                    )
        elif self._left is not None:
            while self._left > 0:
                if not conn.buffer and not await conn.more():
                    raise httpx.RemoteProtocolError(
                        f"{self._url}: peer closed the connection mid-body"
                    )
                data = conn.take(self._left)
                self._left -= len(data)
                if data:
                    yield data
            self._done = True
        else:
            while True:
                if conn.buffer:
                    yield conn.take(len(conn.buffer))
                if not await conn.more() and not conn.buffer:
                    self._done = True
                    return

    def _parse_chunks(self, conn: _Connection) -> tuple[bytes, bool]:
        """Take every complete chunk in the buffer; (their data, whether the body ended)."""
        buffer = conn.buffer
        out: list[bytes] = []
        pos = 0
        finished = False
        while True:
            line_end = buffer.find(b"\r\n", pos)
            if line_end < 0:
                break
            try:
                size = int(bytes(buffer[pos:line_end]).split(b";", 1)[0], 16)
            except ValueError as exc:
                raise httpx.RemoteProtocolError(f"{self._url}: bad chunk size") from exc
            start = line_end + 2
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if buffer[start : start + 2] == b"\r\n":
                    pos, finished = start + 2, True
                elif trailer_end >= 0:
                    pos, finished = trailer_end + 4, True
                break
            if len(buffer) < start + size + 2:
                break
            out.append(bytes(buffer[start : start + size]))
            pos = start + size + 2
        if pos:
            del buffer[:pos]
        return b"".join(out), finished

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive and not conn.buffer:
            self._pool._release(self._key, conn)
        else:
            conn.close()  # mid-body: closing is how the worker learns to abort


async def _bounded(
    awaitable: Any, seconds: float | None, error: type[httpx.TimeoutException], what: str
) -> Any:
    if seconds is None:
        return await awaitable
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError as exc:
        raise error(f"{what}: timed out after {seconds:g}s") from exc


# ---------------------------------------------------------------------------
# The pool


class Http11Transport(httpx.AsyncBaseTransport):
    """Plain HTTP/1.1 with pooled keep-alive connections (see the module docstring)."""

    def __init__(self, *, max_idle_per_host: int = 256, keepalive_expiry: float = 4.0) -> None:
        self._idle: dict[tuple[str, int], collections.deque[_Connection]] = {}
        self._max_idle = max_idle_per_host
        # Below uvicorn's (and so vLLM's) 5 s keep-alive: never reuse a connection
        # the server is about to close.
        self._expiry = keepalive_expiry
        self._prefixes: dict[str, tuple[tuple[str, int], bytes]] = {}
        self._tls: httpx.AsyncHTTPTransport | None = None
        self._closed = False

    # the hot path

    async def post(
        self, url: str, body: bytes, request_id: str, timeouts: dict[str, float | None]
    ) -> Reply:
        """POST a JSON body; the answer's head is read, its body is not."""
        known = self._prefixes.get(url)
        if known is None:
            known = self._prefixes[url] = _prefix(url)
        key, prefix = known
        head = b"%scontent-length: %d\r\nx-request-id: %s\r\n\r\n" % (
            prefix,
            len(body),
            request_id.encode(),
        )
        return await self._exchange(key, url, head + body, timeouts)

    async def _exchange(
        self, key: tuple[str, int], url: str, payload: bytes, timeouts: dict[str, float | None]
    ) -> _Reply:
        for attempt in range(2):
            conn, reused = await self._acquire(key, url, timeouts.get("connect"))
            try:
                assert conn.transport is not None
                conn.transport.write(payload)
                head = await _bounded(
                    _read_head(conn, url), timeouts.get("read"), httpx.ReadTimeout, url
                )
            except _StaleConnectionError:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server had closed it: once more on a fresh one
                raise httpx.RemoteProtocolError(
                    f"{url}: the server closed the connection"
                ) from None
            except OSError as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise httpx.ReadError(f"{url}: {exc}") from exc
            except BaseException:
                conn.close()
                raise
            return _Reply(self, key, conn, url, head)
        raise AssertionError("unreachable")

    async def _acquire(
        self, key: tuple[str, int], url: str, connect: float | None
    ) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()  # the most recently used: the warmest
                if conn.usable(now, self._expiry):
                    return conn, True
                conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await _bounded(
                loop.create_connection(_Connection, key[0], key[1]),
                connect,
                httpx.ConnectTimeout,
                url,
            )
        except OSError as exc:
            raise httpx.ConnectError(f"{url}: {exc}") from exc
        return conn, False

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, collections.deque())
        if self._closed or len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    # the httpx face

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            if self._tls is None:
                self._tls = httpx.AsyncHTTPTransport()
            return await self._tls.handle_async_request(request)
        lines = [request.method.encode(), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        body = await request.aread()
        timeouts: dict[str, float | None] = request.extensions.get("timeout") or {}
        key = (url.host, url.port or 80)
        try:
            reply = await self._exchange(key, str(url), b"".join(lines) + body, timeouts)
        except httpx.TransportError as exc:
            exc.request = request
            raise
        read_timeout = timeouts.get("read")
        return httpx.Response(
            reply.status,
            headers=reply.headers,
            stream=_Stream(reply, read_timeout, str(url)),
            request=request,
        )

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        if self._tls is not None:
            await self._tls.aclose()


class _Stream(httpx.AsyncByteStream):
    def __init__(self, reply: _Reply, read_timeout: float | None, url: str) -> None:
        self._reply = reply
        self._timeout = read_timeout
        self._url = url

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._reply.chunks()
        while True:
            try:
                chunk = await _bounded(anext(chunks), self._timeout, httpx.ReadTimeout, self._url)
            except StopAsyncIteration:
                return
            yield chunk

    async def aclose(self) -> None:
        await self._reply.aclose()


def _prefix(url: str) -> tuple[tuple[str, int], bytes]:
    parsed = httpx.URL(url)
    if parsed.scheme != "http":
        raise ValueError(f"{url}: workers are reached over plain http://")
    key = (parsed.host, parsed.port or 80)
    prefix = b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n" % (
        parsed.raw_path,
        parsed.netloc,
    )
    return key, prefix


# ---------------------------------------------------------------------------
# Any other transport


class _HttpxReply:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.content_type: bytes = response.headers.get("content-type", "application/json").encode()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_raw():
            yield chunk

    async def read(self) -> bytes:
        return await self._response.aread()

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxUpstream:
    """An :class:`Upstream` over any httpx transport (``MockTransport`` in tests)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def post(
        self, url: str, body: bytes, request_id: str, timeouts: dict[str, float | None]
    ) -> Reply:
        request = httpx.Request(
            "POST",
            url,
            headers={"content-type": "application/json", "x-request-id": request_id},
            content=body,
            extensions={"timeout": timeouts},
        )
        return _HttpxReply(await self._transport.handle_async_request(request))


def upstream_for(transport: httpx.AsyncBaseTransport) -> Upstream:
    """The orchestrator's way to a transport: ours directly, any other adapted."""
    if isinstance(transport, Http11Transport):
        return transport
    return HttpxUpstream(transport)

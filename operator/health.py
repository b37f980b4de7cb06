"""Liveness and readiness endpoints for the kubelet's probes.

Our own tiny server rather than kopf's liveness endpoint: kopf only runs in the
replica that holds the Lease, and a replica waiting to lead is healthy too.

- ``GET /healthz``: 200 while the event loop answers (and kopf, once started,
  has not died).
- ``GET /readyz``: 200 once the process is either waiting to lead or running
  kopf with its watches started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

Check = Callable[[], bool]


def _response(code: int, text: str) -> bytes:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
    body = text.encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def answer(request_line: str, live: Check, ready: Check) -> bytes:
    """The whole HTTP response to one request line (pure, for the tests)."""
    parts = request_line.split()
    path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
    if path in ("/healthz", "/livez"):
        return _response(200, "ok\n") if live() else _response(503, "not live\n")
    if path == "/readyz":
        return _response(200, "ok\n") if ready() else _response(503, "not ready\n")
    return _response(404, "not found\n")


class HealthServer:
    def __init__(self, host: str, port: int, live: Check, ready: Check) -> None:
        self._host, self._port = host, port
        self._live, self._ready = live, ready
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        logger.info("Health endpoints on http://%s:%d/healthz and /readyz", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.write(answer(line.decode("latin-1"), self._live, self._ready))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

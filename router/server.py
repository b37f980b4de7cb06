"""Running the router under uvicorn, from the command line or in-process.

Local mode, in its own event loop::

    config = settings.static_settings("tiny", prefill=[p_url], decode=[d_url], mode="auto")
    async with server.serving(config, port=8080) as (url, app):
        ...  # app.set_endpoints("decode", [...]) when the worker set changes

or ``server.build(config, host=..., port=...)`` for a ``uvicorn.Server`` to run
(``await s.serve()``, stop with ``s.should_exit = True``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn

from tandem.router import app as router_app
from tandem.router import settings

__all__ = ["app_of", "build", "serving"]


def _fastest(module: str, fallback: str) -> Any:
    return module if importlib.util.find_spec(module) is not None else fallback


def build(
    config: settings.RouterSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "warning",
    access_log: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
) -> uvicorn.Server:
    """A uvicorn server for the router app (uvloop and httptools when installed)."""
    app = router_app.create_app(config, transport=transport)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=_fastest("uvloop", "asyncio"),
        http=_fastest("httptools", "h11"),
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        # Streams must end when the router stops: do not wait forever on them.
        timeout_graceful_shutdown=30,
    )
    return uvicorn.Server(uv_config)


def app_of(server: uvicorn.Server) -> router_app.RouterApp:
    """The router app a server from :func:`build` runs."""
    found = server.config.app
    assert isinstance(found, router_app.RouterApp)
    return found


@contextlib.asynccontextmanager
async def serving(
    config: settings.RouterSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[tuple[str, router_app.RouterApp]]:
    """Serve the router with uvicorn in this event loop (no thread, no subprocess);
    yields its base URL and the app (``app.set_endpoints(...)`` to change workers).
    ``port=0`` takes a free port."""
    server = build(config, host=host, port=port, transport=transport)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server.config.timeout_graceful_shutdown = 1
    task = asyncio.create_task(server.serve(sockets=[sock]), name="tandem-router-uvicorn")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the router stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}", app_of(server)
    finally:
        server.should_exit = True
        await task
        sock.close()

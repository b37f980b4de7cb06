"""Running the router under uvicorn, from the command line or in-process.

Local mode::

    config = settings.static_settings("tiny", prefill=[p_url], decode=[d_url], mode="auto")
    server = server.build(config, host="127.0.0.1", port=8080)
    task = asyncio.create_task(server.serve())   # ... later: server.should_exit = True
    # and app(server).set_endpoints("decode", [...]) when the worker set changes.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import httpx
import uvicorn

from tandem.router import app as router_app
from tandem.router import settings

__all__ = ["app_of", "build"]


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

"""The router as an ASGI application (raw ASGI: the hot path is a few dict lookups).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed or not),
``GET /v1/models``, ``/health`` (the process is up), ``/ready`` (a decode worker
is known), ``/metrics``.

Everything with a lifetime (the HTTP client, endpoint sets, queue, metrics,
discovery and scraper tasks) is built when the app starts (ASGI lifespan, or
``async with app.running():`` in-process) and torn down when it stops: no
globals, no threads. The worker-facing client is one ``httpx.AsyncClient`` whose
transport can be replaced (``transport=httpx.MockTransport(...)`` in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST

from tandem import roles
from tandem.router import (
    admission,
    attainment,
    discovery,
    endpoints,
    errors,
    metrics,
    orchestration,
    payloads,
    policies,
    settings,
    tokens,
)
from tandem.router import transport as transport_

__all__ = ["RouterApp", "create_app"]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

_JSON = b"application/json"
_PRINTABLE = re.compile(rb"[\x21-\x7e]{1,128}")
_API_PATHS: dict[str, payloads.Api] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
}


class _ClientGoneError(Exception):
    """The client disconnected before its request was read."""


@dataclass
class _Runtime:
    """What lives as long as the app runs."""

    client: httpx.AsyncClient
    sets: dict[roles.Role, endpoints.EndpointSet]
    admission: admission.Admission
    metrics: metrics.RouterMetrics
    orchestrator: orchestration.Orchestrator
    counter: tokens.TokenCounter
    api_keys: frozenset[str]
    models: bytes
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class _Responder:
    """Writes the response through ASGI ``send``; remembers how far it got."""

    __slots__ = ("_extra", "_send", "complete", "started")

    def __init__(self, send: Send, request_id: bytes) -> None:
        self._send = send
        self._extra = (b"x-request-id", request_id)
        self.started = False
        self.complete = False

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        headers.append(self._extra)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, chunk: bytes, more: bool) -> None:
        if not more:
            self.complete = True
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})


class RouterApp:
    """The ASGI app. Build with :func:`create_app`."""

    def __init__(
        self,
        config: settings.RouterSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        discovery_: discovery.Discovery | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._transport = transport
        self._discovery = discovery_
        self._clock = clock
        self._runtime: _Runtime | None = None
        self._metrics: metrics.RouterMetrics | None = None

    # -- lifetime ------------------------------------------------------------

    async def startup(self) -> None:
        config = self.config
        t = config.timeouts
        transport = self._transport or transport_.Http11Transport(
            max_idle_per_host=config.max_connections
        )
        client = httpx.AsyncClient(
            transport=transport,
            # Reads are bounded by the orchestrator's own deadlines (first byte, idle).
            timeout=httpx.Timeout(connect=t.connect, read=None, write=t.idle, pool=t.first_byte),
        )
        sets: dict[roles.Role, endpoints.EndpointSet] = {
            role: endpoints.EndpointSet(role) for role in roles.ROLES
        }
        gate = admission.Admission(
            per_endpoint=config.max_in_flight_per_endpoint,
            max_queued=config.max_queued_requests,
            timeout=t.queue,
            retry_after=config.retry_after_seconds,
        )
        pool = config.pool_label
        meters = metrics.RouterMetrics(pool)
        meters.watch(metrics.StateView(pool, tuple(sets.values()), lambda: gate.queued))
        if config.slo is not None:
            slo = config.slo
            tracker = attainment.Tracker(ttft=slo.ttft, tpot=slo.tpot, window=slo.window)
            meters.track_slo(tracker, slo.percentile / 100, self._clock)
        runtime = _Runtime(
            client=client,
            sets=sets,
            admission=gate,
            metrics=meters,
            orchestrator=orchestration.Orchestrator(
                config=config,
                upstream=transport_.upstream_for(transport),
                prefill=sets["prefill"],
                decode=sets["decode"],
                policy=policies.make(config.policy, config.prefix),
                admission=gate,
                metrics=meters,
                clock=self._clock,
                client=client,
            ),
            counter=tokens.load(config.tokenizer),
            api_keys=config.auth.load_keys(),
            models=payloads.models_body(config.served_model_name, int(time.time())),
        )
        self._runtime = runtime
        self._metrics = meters
        found = self._discovery or discovery.build(config)
        if isinstance(found, discovery.StaticDiscovery):
            await found.run(self.set_endpoints)  # known before the first request
        else:
            runtime.tasks.append(asyncio.create_task(found.run(self.set_endpoints)))
        if config.scrape.enabled:
            scrape_errors = {role: meters.scrape_errors.labels(pool, role) for role in roles.ROLES}
            runtime.tasks.append(
                asyncio.create_task(
                    discovery.scrape_forever(
                        client,
                        sets.values(),
                        interval=config.scrape.interval,
                        timeout=config.scrape.timeout,
                        on_error=lambda role: scrape_errors[role].inc(),
                    )
                )
            )
        logger.info(
            "router for %s: mode %s, policy %s",
            config.served_model_name,
            config.mode,
            config.policy,
        )

    async def shutdown(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        for task in runtime.tasks:
            task.cancel()
        for task in runtime.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await runtime.client.aclose()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RouterApp]:
        """Start and stop around a block (in-process use without an ASGI server)."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()

    def set_endpoints(self, role: roles.Role, urls: Sequence[str]) -> None:
        """Replace one role's workers (discovery calls this; so can local mode)."""
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("the router is not running")
        eps = runtime.sets[role]
        eps.replace(urls)
        if role == "decode":
            runtime.admission.set_endpoints(len(eps))

    @property
    def metrics(self) -> metrics.RouterMetrics:
        """The metrics of the current (or last) run."""
        if self._metrics is None:
            raise RuntimeError("the router has not started")
        return self._metrics

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("router failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        runtime = self._runtime
        api = _API_PATHS.get(path)
        if api is not None:
            if method != "POST":
                await _error(send, errors.MethodNotAllowedError(f"{method} {path} is not allowed"))
            elif runtime is None:
                await _error(send, errors.NoWorkersError("the router is not running"))
            else:
                await self._generate(runtime, api, scope, receive, send)
            return
        if method not in ("GET", "HEAD"):
            await _error(send, errors.MethodNotAllowedError(f"{method} {path} is not allowed"))
            return
        if path == "/health":
            await _plain(send, 200, _JSON, b'{"status":"ok"}')
        elif runtime is None:
            await _error(send, errors.NoWorkersError("the router is starting"))
        elif path == "/ready":
            ready = len(runtime.sets["decode"]) > 0
            body = b'{"status":"ready"}' if ready else b'{"status":"no decode worker"}'
            await _plain(send, 200 if ready else 503, _JSON, body)
        elif path == "/metrics":
            await _plain(send, 200, CONTENT_TYPE_LATEST.encode(), runtime.metrics.render())
        elif path == "/v1/models":
            try:
                self._authorize(runtime, scope)
            except errors.RouterError as exc:
                runtime.metrics.outcome[exc.outcome].inc()
                await _error(send, exc)
                return
            await _plain(send, 200, _JSON, runtime.models)
        else:
            await _error(send, errors.NotFoundError(f"no route {path}"))

    def _authorize(self, runtime: _Runtime, scope: Scope) -> None:
        keys = runtime.api_keys
        if not keys:
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        if not token or not any(hmac.compare_digest(token, k.encode()) for k in keys):
            raise errors.AuthenticationError(
                "a valid API key is required (Authorization: Bearer ...)"
            )

    async def _generate(
        self, runtime: _Runtime, api: payloads.Api, scope: Scope, receive: Receive, send: Send
    ) -> None:
        arrival = self._clock()
        request_id = b""
        length = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"content-length":
                length = int(value) if value.isdigit() else -1
        # Workers get an id of their own for each request (two clients may send the
        # same one), prefixed with the client's for tracing; the client gets its own back.
        upstream_id = orchestration.new_request_id()
        if request_id and _PRINTABLE.fullmatch(request_id):
            upstream_id = f"{request_id.decode()}-{upstream_id[:12]}"
        else:
            request_id = upstream_id.encode()
        responder = _Responder(send, request_id)
        outcome = "error"
        try:
            self._authorize(runtime, scope)
            limit = self.config.limits.max_body_bytes
            if length > limit:
                raise _too_large(limit)
            raw = await _read_body(receive, limit)
            request = payloads.parse(api, raw, self.config, runtime.counter)
            outcome = await _watching_disconnect(
                receive,
                responder,
                runtime.orchestrator.serve(request, responder, upstream_id, arrival),
            )
        except errors.RouterError as exc:
            outcome = exc.outcome
            if not responder.started:
                await _error(send, exc, request_id)
        except _ClientGoneError:
            outcome = "cancelled"
        except Exception:
            logger.exception("request %s failed", upstream_id)
            outcome = "error"
            if not responder.started:
                await _error(send, errors.RouterError("internal error"), request_id)
            elif not responder.complete:
                await responder.body(errors.sse_event(errors.RouterError("internal error")), False)
        runtime.metrics.outcome[outcome].inc()


async def _watching_disconnect(receive: Receive, responder: _Responder, work: Any) -> str:
    """Run ``work``; if the client disconnects first, cancel it (closing the upstream
    request) and report ``cancelled``."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not responder.complete:
                    gone = True
                    task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        outcome: str = await work
        return outcome
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        return "cancelled"
    finally:
        watcher.cancel()


async def _read_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGoneError
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


def _too_large(limit: int) -> errors.PayloadTooLargeError:
    return errors.PayloadTooLargeError(f"request body is larger than {limit} bytes")


async def _plain(send: Send, status: int, content_type: bytes, body: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, exc: errors.RouterError, request_id: bytes = b"") -> None:
    status, headers, body = errors.http_response(exc)
    headers.append((b"content-length", str(len(body)).encode()))
    if request_id:
        headers.append((b"x-request-id", request_id))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    config: settings.RouterSettings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    discovery_: discovery.Discovery | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RouterApp:
    """The router app for ``config``. ``transport`` replaces the one that reaches the
    workers (tests); ``discovery_`` replaces the one the settings name."""
    return RouterApp(config, transport=transport, discovery_=discovery_, clock=clock)

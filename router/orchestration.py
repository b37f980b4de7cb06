"""One request's way through the pools: the prefill hop, the decode hop, the faults.

:class:`Orchestrator` does the I/O around the pure parts (``payloads`` builds the
bodies, ``policies`` picks the workers). It writes to the client through a
:class:`Responder` (two coroutines), so it knows nothing of ASGI.

The two hops, as vLLM's NixlConnector expects them:

1. to a prefill worker: the request with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={do_remote_decode: true, ...}``; the answer carries the
   ``kv_transfer_params`` (engine id, block ids, host, port) of the computed KV;
2. to a decode worker: the original request plus those ``kv_transfer_params``; it
   pulls the KV over NIXL and generates; its bytes are streamed to the client.

Faults: a prefill that fails or times out is retried on another prefill worker,
then the decode worker prefills itself (the request without ``kv_transfer_params``).
A decode that fails before the client got a byte is retried on another decode
worker; after that, the stream ends with an OpenAI-style error event and
``[DONE]``. Every wait is bounded by ``settings.timeouts``. Cancelling the task
(the client went away) closes the upstream connection, which makes vLLM abort.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from tandem.router import (
    admission,
    endpoints,
    errors,
    metrics,
    payloads,
    policies,
    settings,
    transport,
)

__all__ = ["Orchestrator", "Responder", "new_request_id"]

logger = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

_RETRYABLE_STATUS = frozenset({408, 429})
"""4xx answers that are the worker's state, not the request's fault."""


class Responder(Protocol):
    """Where the client's response goes."""

    async def start(self, status: int, headers: Headers) -> None: ...

    async def body(self, chunk: bytes, more: bool) -> None: ...


def new_request_id() -> str:
    return uuid.uuid4().hex


class _AttemptError(Exception):
    """One attempt on one worker failed in a way worth trying elsewhere."""

    def __init__(self, error: errors.UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class Orchestrator:
    config: settings.RouterSettings
    upstream: transport.Upstream
    """The way to the workers: the app's client's transport, called without httpx's
    request/response objects on the hot path (see ``transport``)."""
    prefill: endpoints.EndpointSet
    decode: endpoints.EndpointSet
    policy: policies.Policy
    admission: admission.Admission
    metrics: metrics.RouterMetrics
    clock: Callable[[], float] = time.monotonic
    _timeouts: dict[str, float | None] = field(default_factory=dict, init=False)
    _warned: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        t = self.config.timeouts
        # Reads are bounded by asyncio deadlines here (first byte, idle, whole hop).
        self._timeouts.update(connect=t.connect, read=None, write=t.idle, pool=t.first_byte)

    # -- the whole request -------------------------------------------------

    async def serve(
        self, request: payloads.Request, respond: Responder, request_id: str, arrival: float
    ) -> str:
        """Serve one checked request; returns its outcome label. Raises a
        :class:`~tandem.router.errors.RouterError` only before anything was sent."""
        if self.admission.active >= self.admission.capacity or self.admission.queued:
            waited = self.clock()
            await self.admission.acquire()
            self.metrics.queue_wait.observe(self.clock() - waited)
        else:
            await self.admission.acquire()
        try:
            body = await self._prepare(request, request_id)
            return await self._decode(request, body, respond, request_id, arrival)
        finally:
            self.admission.release()

    async def _prepare(self, request: payloads.Request, request_id: str) -> bytes:
        """The body for the decode worker, after the prefill hop when there is one."""
        mode = self.config.mode
        routed = self.metrics.routed
        if mode == "aggregated":
            routed["aggregated"].inc()
            return payloads.local_body(request)
        if mode == "auto" and (request.prompt_tokens or 0) < self.config.auto_threshold_tokens:
            routed["short_prompt"].inc()
            return payloads.local_body(request)
        if not len(self.prefill):
            self.metrics.fallbacks["no_prefill_worker"].inc()
            routed["fallback"].inc()
            return payloads.local_body(request)
        params, reason = await self._prefill(request, request_id)
        if params is None:
            self.metrics.fallbacks[reason].inc()
            routed["fallback"].inc()
            return payloads.local_body(request)
        routed["disaggregated"].inc()
        return payloads.decode_body(request, params)

    # -- hop 1 ---------------------------------------------------------------

    async def _prefill(
        self, request: payloads.Request, request_id: str
    ) -> tuple[dict[str, Any] | None, str]:
        """The prefill worker's ``kv_transfer_params``, or None and why not."""
        body = payloads.prefill_body(request)
        path = payloads.PATHS[request.api]
        tried: set[str] = set()
        for attempt in range(1 + self.config.retries.prefill):
            endpoint = self.policy(
                request.features, self.prefill.snapshot(self.clock(), frozenset(tried))
            )
            if endpoint is None:
                break
            if attempt:
                self.metrics.retries["prefill"].inc()
            url = endpoint.url
            tried.add(url)
            started = self.clock()
            self.prefill.acquire(url)
            try:
                async with asyncio.timeout(self.config.timeouts.prefill):
                    status, content, content_type = await self._fetch(url + path, body, request_id)
            except (httpx.HTTPError, TimeoutError) as exc:
                self._attempt_failed(self.prefill, url, exc)
                continue
            finally:
                self.prefill.release(url)
            if status >= 500 or status in _RETRYABLE_STATUS:
                self._attempt_failed(self.prefill, url, None, status)
                continue
            if status >= 400:
                raise errors.UpstreamRejectedError(status, content, content_type)
            self.prefill.mark_up(url)
            self.metrics.prefill_hop.observe(self.clock() - started)
            params = payloads.kv_transfer_params(content)
            if params is None:
                if url not in self._warned:  # a configuration problem: say it once per worker
                    self._warned.add(url)
                    logger.warning(
                        "prefill worker %s answers without kv_transfer_params (is its "
                        "--kv-transfer-config set?): its requests are prefilled on decode",
                        url,
                    )
                return None, "no_kv_params"
            return params, ""
        return None, "prefill_failed"

    # -- hop 2 ---------------------------------------------------------------

    async def _decode(
        self,
        request: payloads.Request,
        body: bytes,
        respond: Responder,
        request_id: str,
        arrival: float,
    ) -> str:
        path = payloads.PATHS[request.api]
        tried: set[str] = set()
        last: errors.RouterError = errors.NoWorkersError("no decode worker is available")
        for attempt in range(1 + self.config.retries.decode):
            endpoint = self.policy(
                request.features, self.decode.snapshot(self.clock(), frozenset(tried))
            )
            if endpoint is None:
                break
            if attempt:
                self.metrics.retries["decode"].inc()
            url = endpoint.url
            tried.add(url)
            self.decode.acquire(url)
            try:
                target = url + path
                if request.stream:
                    return await self._stream(target, body, request_id, url, respond, arrival)
                return await self._whole(target, body, request_id, url, respond, arrival)
            except _AttemptError as failed:
                last = failed.error
            finally:
                self.decode.release(url)
        raise last

    async def _whole(
        self,
        target: str,
        body: bytes,
        request_id: str,
        url: str,
        respond: Responder,
        arrival: float,
    ) -> str:
        """A non-streamed answer: read it all (retryable until then), then send it."""
        try:
            async with asyncio.timeout(self.config.timeouts.request):
                status, content, content_type = await self._fetch(target, body, request_id)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise self._failed(url, exc) from exc
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise self._failed(url, None, status)
        if status >= 400:
            raise errors.UpstreamRejectedError(status, content, content_type)
        self.decode.mark_up(url)
        await respond.start(
            200,
            [(b"content-type", content_type), (b"content-length", str(len(content)).encode())],
        )
        await respond.body(content, False)
        self.metrics.duration.observe(self.clock() - arrival)
        return "ok"

    async def _stream(
        self,
        target: str,
        body: bytes,
        request_id: str,
        url: str,
        respond: Responder,
        arrival: float,
    ) -> str:
        """A streamed answer: retryable until its first body byte, then passed through."""
        timeouts = self.config.timeouts
        clock = self.clock
        reply: transport.Reply | None = None
        started = False
        events = 0
        first = last = 0.0
        try:
            async with asyncio.timeout(timeouts.first_byte) as deadline:
                try:
                    reply = await self.upstream.post(target, body, request_id, self._timeouts)
                    status = reply.status
                    if status != 200:
                        content = await reply.read()
                        if status >= 500 or status in _RETRYABLE_STATUS:
                            raise self._failed(url, None, status)
                        raise errors.UpstreamRejectedError(status, content, reply.content_type)
                    chunks = reply.chunks()
                    chunk = await anext(chunks, b"")
                except httpx.HTTPError as exc:
                    raise self._failed(url, exc) from exc
                # The client gets bytes from here on: no more retries.
                self.decode.mark_up(url)
                started = True
                first = last = clock()
                self.metrics.ttft.observe(first - arrival)
                await respond.start(200, [(b"content-type", reply.content_type)])
                while chunk:
                    events += chunk.count(b"data:")
                    await respond.body(chunk, True)
                    last = clock()
                    deadline.reschedule(last + timeouts.idle)
                    chunk = await anext(chunks, b"")
                await respond.body(b"", False)
        except TimeoutError as exc:
            if not started:
                raise self._failed(url, exc) from exc
            return await self._break(
                respond, errors.UpstreamTimeoutError("the decode worker stalled")
            )
        except httpx.HTTPError as exc:
            logger.warning("decode worker %s broke a stream: %s", url, exc)
            self.metrics.upstream_errors.labels(self.metrics_pool, "decode").inc()
            return await self._break(
                respond, errors.UpstreamError(f"the decode worker failed: {exc}")
            )
        finally:
            if reply is not None:
                await reply.aclose()
        now = clock()
        self.metrics.duration.observe(now - arrival)
        # One event per token, less the first and the closing [DONE]: an estimate.
        if events > 2 and last > first:
            self.metrics.tpot.observe((last - first) / (events - 2))
        return "ok"

    async def _break(self, respond: Responder, error: errors.RouterError) -> str:
        """End a started stream with an error event and ``[DONE]`` (bounded: a
        client that stopped reading does not hold us)."""
        try:
            async with asyncio.timeout(self.config.timeouts.idle):
                await respond.body(errors.sse_event(error), False)
        except TimeoutError:
            pass
        return "broken_stream"

    # -- upstream I/O ------------------------------------------------------------

    async def _fetch(self, target: str, body: bytes, request_id: str) -> tuple[int, bytes, bytes]:
        """Status, whole body and content type of a non-streamed answer."""
        reply = await self.upstream.post(target, body, request_id, self._timeouts)
        try:
            content = await reply.read()
        finally:
            await reply.aclose()
        return reply.status, content, reply.content_type

    # -- failures --------------------------------------------------------------

    @property
    def metrics_pool(self) -> str:
        return self.config.pool_label

    def _attempt_failed(
        self,
        eps: endpoints.EndpointSet,
        url: str,
        exc: BaseException | None,
        status: int | None = None,
    ) -> errors.UpstreamError:
        """Account for a failed attempt; returns what the client would be told."""
        self.metrics.upstream_errors.labels(self.metrics_pool, eps.role).inc()
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            eps.mark_down(url, self.clock() + self.config.endpoint_cooldown)
        if isinstance(exc, TimeoutError | httpx.TimeoutException):
            logger.warning("%s worker %s timed out", eps.role, url)
            return errors.UpstreamTimeoutError(f"the {eps.role} worker timed out")
        reason = f"status {status}" if exc is None else f"{type(exc).__name__}: {exc}"
        logger.warning("%s worker %s failed: %s", eps.role, url, reason)
        return errors.UpstreamError(f"the {eps.role} worker failed ({reason})")

    def _failed(
        self, url: str, exc: BaseException | None, status: int | None = None
    ) -> _AttemptError:
        return _AttemptError(self._attempt_failed(self.decode, url, exc, status))

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
worker. One that fails after (connection reset, killed, stalled, an error event
of its own) moves: the stream goes on on another decode worker from the tokens
the client already has (``migration``), up to ``settings.migration_limit`` times;
when it cannot, the stream ends with an OpenAI-style error event and ``[DONE]``.
Every wait is bounded by ``settings.timeouts``. Cancelling the task
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
    migration,
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


class _BrokenError(Exception):
    """A stream failed after the client got bytes: move it, or end it with ``error``."""

    def __init__(self, error: errors.RouterError) -> None:
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
    client: httpx.AsyncClient | None = None
    """For the rare GET a migration needs (a worker's ``max_model_len``)."""
    _timeouts: dict[str, float | None] = field(default_factory=dict, init=False)
    _warned: set[str] = field(default_factory=set, init=False)
    _model_len: dict[str, int] = field(default_factory=dict, init=False)

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
            relay = None
            if self.config.migration_limit and migration.movable(request):
                relay = migration.Relay.for_request(request)
            body = await self._prepare(request, request_id, relay is not None)
            return await self._decode(request, body, respond, request_id, arrival, relay)
        finally:
            self.admission.release()

    async def _prepare(self, request: payloads.Request, request_id: str, ids: bool) -> bytes:
        """The body for the decode worker, after the prefill hop when there is one
        (asking for the token ids a migration needs when ``ids``)."""
        mode = self.config.mode
        routed = self.metrics.routed
        if mode == "aggregated":
            routed["aggregated"].inc()
            return payloads.local_body(request, token_ids=ids)
        if mode == "auto" and (request.prompt_tokens or 0) < self.config.auto_threshold_tokens:
            routed["short_prompt"].inc()
            return payloads.local_body(request, token_ids=ids)
        if not len(self.prefill):
            self.metrics.fallbacks["no_prefill_worker"].inc()
            routed["fallback"].inc()
            return payloads.local_body(request, token_ids=ids)
        params, reason = await self._prefill(request, request_id)
        if params is None:
            self.metrics.fallbacks[reason].inc()
            routed["fallback"].inc()
            return payloads.local_body(request, token_ids=ids)
        routed["disaggregated"].inc()
        return payloads.decode_body(request, params, token_ids=ids)

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
        relay: migration.Relay | None,
    ) -> str:
        path = payloads.PATHS[request.api]
        tried: set[str] = set()
        last: errors.RouterError = errors.NoWorkersError("no decode worker is available")
        broken: errors.RouterError | None = None
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
                    await self._stream(target, body, request_id, url, respond, relay, arrival)
                    self._finished(arrival)
                    return "ok"
                return await self._whole(target, body, request_id, url, respond, arrival)
            except _AttemptError as failed:
                last = failed.error
            except _BrokenError as exc:
                broken = exc.error
                break
            finally:
                self.decode.release(url)
        if broken is None:
            raise last
        if relay is None:
            return await self._break(respond, broken)
        return await self._migrate(request, relay, respond, request_id, tried, broken, arrival)

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
        relay: migration.Relay | None,
        arrival: float | None,
    ) -> None:
        """A streamed answer: retryable until its first body byte (raises
        :class:`_AttemptError`), then passed through, or through ``relay`` when the
        stream may move (raises :class:`_BrokenError` when it breaks). ``arrival``
        is None for a continuation: the client's response has started already."""
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
                if arrival is not None:
                    self.metrics.ttft.observe(first - arrival)
                    await respond.start(200, [(b"content-type", reply.content_type)])
                ended = relay is None
                while chunk:
                    events += chunk.count(b"data:")
                    if relay is None:
                        await respond.body(chunk, True)
                    else:
                        out, verdict = relay.feed(chunk)
                        if out:
                            await respond.body(out, True)
                        if verdict == "failed":
                            raise _BrokenError(
                                self._broke(url, f"the decode worker failed: {relay.failure}")
                            )
                        ended = verdict == "done"
                    last = clock()
                    deadline.reschedule(last + timeouts.idle)
                    chunk = await anext(chunks, b"")
                if not ended:
                    raise _BrokenError(self._broke(url, "the decode worker ended the stream early"))
                await respond.body(b"", False)
        except TimeoutError as exc:
            if not started:
                raise self._failed(url, exc) from exc
            logger.warning("decode worker %s stalled a stream", url)
            raise _BrokenError(errors.UpstreamTimeoutError("the decode worker stalled")) from exc
        except httpx.HTTPError as exc:
            raise _BrokenError(self._broke(url, f"the decode worker failed: {exc}")) from exc
        finally:
            if reply is not None:
                await reply.aclose()
        # One event per token, less the first and the closing [DONE]: an estimate.
        tpot = (last - first) / (events - 2) if events > 2 and last > first else None
        if arrival is not None and tpot is not None:
            self.metrics.tpot.observe(tpot)
        if arrival is not None and self.metrics.slo is not None:
            self.metrics.slo.record(last, first - arrival, tpot)

    def _broke(self, url: str, message: str) -> errors.UpstreamError:
        logger.warning("decode worker %s broke a stream: %s", url, message)
        self.metrics.upstream_errors.labels(self.metrics_pool, "decode").inc()
        return errors.UpstreamError(message)

    def _finished(self, arrival: float) -> None:
        self.metrics.duration.observe(self.clock() - arrival)

    async def _migrate(
        self,
        request: payloads.Request,
        relay: migration.Relay,
        respond: Responder,
        request_id: str,
        tried: set[str],
        error: errors.RouterError,
        arrival: float,
    ) -> str:
        """Go on with a broken stream on other decode workers (see ``migration``)."""
        counted = self.metrics.migrations
        limit = self.config.migration_limit
        while True:
            if relay.finished or relay.left() == 0:
                # The client has every token: only the stream's end is missing.
                finish = None if relay.finished else "length"
                await self._send_last(respond, relay.ending(finish))
                self._finished(arrival)
                return "ok"
            if not relay.movable:
                counted["failed"].inc()
                return await self._break(respond, error)
            if relay.hops >= limit:
                counted["exhausted"].inc()
                return await self._break(respond, error)
            endpoint = self.policy(
                request.features, self.decode.snapshot(self.clock(), frozenset(tried))
            )
            if endpoint is None:
                counted["failed"].inc()
                return await self._break(respond, error)
            url = endpoint.url
            tried.add(url)
            model_len = None
            if relay.left() is None:
                model_len = await self._max_model_len(url)
                if model_len is None:
                    counted["failed"].inc()
                    return await self._break(respond, error)
            body = relay.continuation(model_len)
            target = url + payloads.PATHS["completions"]
            logger.info(
                "request %s: moving its stream to %s after %d tokens (move %d of %d)",
                request_id,
                url,
                len(relay.generated),
                relay.hops,
                limit,
            )
            self.decode.acquire(url)
            try:
                await self._stream(
                    target, body, f"{request_id}-m{relay.hops}", url, respond, relay, None
                )
                counted["ok"].inc()
                self._finished(arrival)
                return "ok"
            except _AttemptError:
                counted["failed"].inc()
            except _BrokenError as exc:
                counted["ok"].inc()  # it went on, then broke in its turn
                error = exc.error
            except errors.UpstreamRejectedError as exc:
                logger.warning("request %s: the continuation was refused: %s", request_id, exc)
                counted["failed"].inc()
                return await self._break(respond, error)
            finally:
                self.decode.release(url)

    async def _max_model_len(self, url: str) -> int | None:
        """The worker's ``max_model_len`` from its ``/v1/models`` (vLLM reports it)."""
        known = self._model_len.get(url)
        if known is not None or self.client is None:
            return known
        try:
            reply = await self.client.get(url + "/v1/models", timeout=self.config.timeouts.connect)
            value = reply.json()["data"][0]["max_model_len"]
        except (httpx.HTTPError, ValueError, LookupError, TypeError) as exc:
            logger.warning("no max_model_len from %s: %s", url, exc)
            return None
        if not isinstance(value, int):
            return None
        self._model_len[url] = value
        return value

    async def _send_last(self, respond: Responder, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.config.timeouts.idle):
                await respond.body(data, False)
        except TimeoutError:
            pass

    async def _break(self, respond: Responder, error: errors.RouterError) -> str:
        """End a started stream with an error event and ``[DONE]`` (bounded: a
        client that stopped reading does not hold us)."""
        await self._send_last(respond, errors.sse_event(error))
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

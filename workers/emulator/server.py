"""The emulator's HTTP face: what vLLM's OpenAI server answers, on a Starlette app.

``build_app(settings)`` returns the ASGI app; its lifespan runs the engine loop.
Two ways to run it in-process (tests, local mode):

* ``async with serving(settings) as base_url:`` serves it with uvicorn on a free
  127.0.0.1 port, in the running event loop (no thread, no subprocess);
* ``async with in_process(settings) as client:`` gives an ``httpx.AsyncClient``
  wired to the app through ``httpx.ASGITransport`` (no socket at all; note that
  ASGITransport hands a streamed body over only once it is complete).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or SSE with
``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import httpx
import pydantic
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tandem import roles
from tandem.workers.emulator import engine, metrics, protocol, scheduling

__all__ = ["EmulatorSettings", "Role", "build_app", "in_process", "serving"]

logger = logging.getLogger(__name__)

Role = roles.WorkerKind
"""``prefill`` honours ``do_remote_decode``, ``decode`` honours ``do_remote_prefill``,
``aggregated`` honours either (vLLM's ``kv_role: kv_both``). A direction the role does not
take is ignored and the request is served locally."""

_Model = TypeVar("_Model", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class EmulatorSettings:
    """One emulated vLLM server."""

    model_name: str = "emulated-llama-3.1-8b"
    """The served model name (vLLM's ``--served-model-name``); requests naming another get 404."""
    role: Role = "aggregated"
    """Which KV hand-over directions this worker takes part in."""
    scheduler: scheduling.SchedulerConfig = field(default_factory=scheduling.SchedulerConfig)
    """GPU, model shape, KV cache and batching knobs."""
    max_model_len: int = 8192
    """Longest prompt + output accepted (vLLM's ``--max-model-len``)."""
    default_max_tokens: int = 16
    """Output length of a chat request that names no ``max_tokens`` (the emulator never
    samples an end-of-sequence token; completions default to 16 as in vLLM)."""
    time_scale: float = 1.0
    """Emulated seconds per wall second (>1 runs faster than a real GPU)."""
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    """``remote_engine_id`` this worker reports to decode workers."""
    kv_host: str = "127.0.0.1"
    """``remote_host`` this worker reports (where a decode worker would pull the KV)."""
    kv_port: int = 5600
    """``remote_port`` this worker reports (vLLM's ``VLLM_NIXL_SIDE_CHANNEL_PORT``)."""


class _EventStream(StreamingResponse):
    """An SSE response that also watches for the client going away.

    On a disconnect the body iterator is cancelled and closed, so the request
    it streams is aborted and its KV freed (Starlette's StreamingResponse only
    notices on the next failed send with ASGI >= 2.4).
    """

    def __init__(self, chunks: AsyncGenerator[bytes]) -> None:
        super().__init__(chunks, media_type="text/event-stream")
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async with anyio.create_task_group() as group:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                async for chunk in self._chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._chunks.aclose()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _parse(request: Request, model: type[_Model]) -> _Model:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise protocol.ApiError(400, f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise protocol.ApiError(400, "The request body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        param = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        raise protocol.ApiError(400, message, param) from exc


@dataclass
class _Job:
    """One accepted request on its way through the engine."""

    response_id: str
    engine_id: str
    prompt_tokens: int
    max_tokens: int
    state: int
    """The generation state after the prompt and ``generated`` (``protocol.next_token``)."""
    prompt_ids: list[int]
    remote_decode: bool
    stream: engine.RequestStream
    generated: list[int] = field(default_factory=list)


class _Service:
    def __init__(self, settings: EmulatorSettings, clock: engine.Clock) -> None:
        self.settings = settings
        cfg = settings.scheduler
        self.metrics = metrics.EngineMetrics(
            settings.model_name,
            stats=lambda: self.engine.stats(),
            max_model_len=settings.max_model_len,
            cache_info={
                "block_size": str(cfg.block_size),
                "cache_dtype": "auto",
                "enable_prefix_caching": "False",
                "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
                "num_gpu_blocks": str(cfg.total_blocks),
            },
            # NIXL posts one descriptor per block for K and for V in every layer.
            descriptors_per_block=2 * cfg.shape.num_layers,
        )
        self.engine = engine.Engine(cfg, clock=clock, observer=self.metrics)
        self.created = int(time.time())
        self._ids = itertools.count()

    # -- routes --------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status_code=503 if self.engine.error is not None else 200)

    async def models(self, request: Request) -> Response:
        name = self.settings.model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.settings.max_model_len,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=metrics.CONTENT_TYPE)

    async def completions(self, request: Request) -> Response:
        body = await _parse(request, protocol.CompletionRequest)
        self._check(body)
        prompt_ids = self._completion_prompt(body.prompt, self._vocab)
        prompt_tokens = len(prompt_ids)
        max_tokens = (
            body.max_tokens if body.max_tokens is not None else self.settings.default_max_tokens
        )
        job = self._submit(request, "cmpl", prompt_ids, max_tokens, body.kv_transfer_params)
        include_usage, continuous = self._usage_options(body)
        if body.stream:
            return _EventStream(
                self._completion_events(job, include_usage, continuous, body.return_token_ids)
            )
        tokens = await self._collect(request, job)
        ids = [self._token(job, t.index) for t in tokens]
        return JSONResponse(
            protocol.completion_response(
                request_id=job.response_id,
                created=int(time.time()),
                model=self.settings.model_name,
                text="".join(protocol.token_text(i) for i in ids),
                token_ids=ids if body.return_token_ids else None,
                prompt_token_ids=prompt_ids,
                finish_reason=tokens[-1].finish_reason if tokens else None,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(tokens),
                kv_transfer_params=self._kv_transfer_params(job),
            )
        )

    async def chat(self, request: Request) -> Response:
        body = await _parse(request, protocol.ChatCompletionRequest)
        self._check(body)
        prompt_ids = protocol.chat_prompt_ids(body.messages, self._vocab)
        prompt_tokens = len(prompt_ids)
        max_tokens = (
            body.max_completion_tokens or body.max_tokens or self.settings.default_max_tokens
        )
        job = self._submit(
            request,
            "chatcmpl",
            prompt_ids,
            max_tokens,
            body.kv_transfer_params,
        )
        include_usage, continuous = self._usage_options(body)
        if body.stream:
            return _EventStream(
                self._chat_events(job, include_usage, continuous, body.return_token_ids)
            )
        tokens = await self._collect(request, job)
        ids = [self._token(job, t.index) for t in tokens]
        return JSONResponse(
            protocol.chat_response(
                request_id=job.response_id,
                created=int(time.time()),
                model=self.settings.model_name,
                text="".join(protocol.token_text(i) for i in ids),
                token_ids=ids if body.return_token_ids else None,
                finish_reason=tokens[-1].finish_reason if tokens else None,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(tokens),
                kv_transfer_params=self._kv_transfer_params(job),
            )
        )

    # -- request handling ----------------------------------------------------

    def _check(self, body: protocol.CompletionRequest | protocol.ChatCompletionRequest) -> None:
        if body.model is not None and body.model != self.settings.model_name:
            raise protocol.ApiError(404, f"The model `{body.model}` does not exist.", "model")
        if body.n != 1:
            raise protocol.ApiError(400, "The emulator supports n=1 only.", "n")

    @staticmethod
    def _completion_prompt(
        prompt: str | list[int] | list[str] | list[list[int]], vocab_size: int
    ) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = protocol.text_ids(prompt, vocab_size)
        elif all(isinstance(t, int) for t in prompt):
            ids = [t for t in prompt if isinstance(t, int)]
        else:
            raise protocol.ApiError(400, "The emulator serves one prompt per request.", "prompt")
        if not ids:
            raise protocol.ApiError(400, "The prompt cannot be empty.", "prompt")
        return ids

    @staticmethod
    def _usage_options(
        body: protocol.CompletionRequest | protocol.ChatCompletionRequest,
    ) -> tuple[bool, bool]:
        options = body.stream_options
        if not body.stream or options is None:
            return False, False
        return bool(options.include_usage), bool(
            options.include_usage and options.continuous_usage_stats
        )

    def _submit(
        self,
        request: Request,
        prefix: str,
        prompt_ids: list[int],
        max_tokens: int,
        raw_kv_params: Mapping[str, Any] | None,
    ) -> _Job:
        prompt_tokens = len(prompt_ids)
        limit = self.settings.max_model_len
        if prompt_tokens >= limit:
            raise protocol.ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input.",
                "prompt",
            )
        if prompt_tokens + max_tokens > limit:
            raise protocol.ApiError(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                f"maximum context length is {limit} tokens and your request has {prompt_tokens} "
                f"input tokens ({max_tokens} > {limit} - {prompt_tokens}).",
                "max_tokens",
            )
        remote_prefill, remote_decode = self._kv_directions(raw_kv_params)
        base = request.headers.get("x-request-id") or uuid.uuid4().hex
        engine_id = f"{prefix}-{base}-{next(self._ids)}"
        spec = scheduling.RequestSpec(
            engine_id, prompt_tokens, max_tokens, remote_prefill, remote_decode
        )
        try:
            stream = self.engine.submit(spec)
        except engine.EngineDeadError as exc:
            raise protocol.ApiError(503, "The engine is not running.") from exc
        except ValueError as exc:
            raise protocol.ApiError(400, str(exc), "max_tokens") from exc
        return _Job(
            response_id=f"{prefix}-{base}",
            engine_id=engine_id,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            state=protocol.context_state(prompt_ids),
            prompt_ids=prompt_ids,
            remote_decode=remote_decode,
            stream=stream,
        )

    def _kv_directions(self, raw: Mapping[str, Any] | None) -> tuple[bool, bool]:
        """``(remote_prefill, remote_decode)`` this request gets on this worker's role."""
        if not raw:
            return False, False
        try:
            params = protocol.KvTransferParams.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise protocol.ApiError(
                400, f"Invalid kv_transfer_params: {exc}", "kv_transfer_params"
            ) from exc
        role = self.settings.role
        remote_decode = params.do_remote_decode and role in ("prefill", "aggregated")
        remote_prefill = False
        if params.do_remote_prefill and role in ("decode", "aggregated"):
            if params.complete_for_remote_prefill():
                remote_prefill = True
            else:
                # As vLLM's recompute policy: count the failed load, prefill locally.
                logger.warning(
                    "kv_transfer_params without remote blocks or address; prefilling locally"
                )
                self.metrics.record_failed_transfer()
        return remote_prefill, remote_decode

    def _kv_transfer_params(self, job: _Job) -> dict[str, Any] | None:
        finished = job.stream.finished
        if not job.remote_decode or finished is None or not finished.kv_block_ids:
            return None
        s = self.settings
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(finished.kv_block_ids),
            "remote_engine_id": s.engine_id,
            "remote_request_id": job.engine_id,
            "remote_host": s.kv_host,
            "remote_port": s.kv_port,
            "tp_size": 1,
        }

    @property
    def _vocab(self) -> int:
        return self.settings.scheduler.shape.vocab_size

    def _token(self, job: _Job, index: int) -> int:
        """The output token at ``index`` (tokens are generated in order)."""
        while len(job.generated) <= index:
            token, job.state = protocol.next_token(job.state, self._vocab)
            job.generated.append(token)
        return job.generated[index]

    async def _collect(self, request: Request, job: _Job) -> list[scheduling.TokenEvent]:
        """All tokens of a non-streamed request; aborts it if the client goes away."""

        async def collect() -> list[scheduling.TokenEvent]:
            return [token async for token in job.stream]

        generation = asyncio.ensure_future(collect())
        disconnect = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            await asyncio.wait({generation, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if not generation.done():
                raise protocol.ApiError(400, "The client disconnected.")
            try:
                return generation.result()
            except engine.EngineDeadError as exc:
                raise protocol.ApiError(503, "The engine stopped.") from exc
        finally:
            generation.cancel()
            disconnect.cancel()
            job.stream.abort()

    async def _completion_events(
        self, job: _Job, include_usage: bool, continuous: bool, token_ids: bool
    ) -> AsyncGenerator[bytes]:
        model = self.settings.model_name
        created = int(time.time())
        n = 0
        try:
            async for token in job.stream:
                n += 1
                sampled = self._token(job, token.index)
                chunk = protocol.completion_chunk(
                    request_id=job.response_id,
                    created=created,
                    model=model,
                    text=protocol.token_text(sampled),
                    finish_reason=token.finish_reason,
                    token_ids=[sampled] if token_ids else None,
                    prompt_token_ids=job.prompt_ids if n == 1 else None,
                )
                if continuous:
                    chunk["usage"] = protocol.usage(job.prompt_tokens, n)
                yield protocol.sse(chunk)
            if include_usage:
                yield protocol.sse(
                    protocol.usage_chunk(
                        request_id=job.response_id,
                        obj="text_completion",
                        created=created,
                        model=model,
                        prompt_tokens=job.prompt_tokens,
                        completion_tokens=n,
                    )
                )
            yield protocol.SSE_DONE
        except engine.EngineDeadError:
            yield protocol.sse(protocol.ApiError(503, "The engine stopped.").body())
        finally:
            job.stream.abort()

    async def _chat_events(
        self, job: _Job, include_usage: bool, continuous: bool, token_ids: bool
    ) -> AsyncGenerator[bytes]:
        model = self.settings.model_name
        created = int(time.time())
        n = 0

        def chunk(
            delta: Mapping[str, Any], finish_reason: str | None, ids: list[int] | None = None
        ) -> dict[str, Any]:
            payload = protocol.chat_chunk(
                request_id=job.response_id,
                created=created,
                model=model,
                delta=delta,
                finish_reason=finish_reason,
                token_ids=ids,
            )
            if continuous:
                payload["usage"] = protocol.usage(job.prompt_tokens, n)
            return payload

        try:
            first = chunk({"role": "assistant", "content": ""}, None)
            if token_ids:  # vLLM sends the prompt's ids with the first event
                first["prompt_token_ids"] = job.prompt_ids
            yield protocol.sse(first)
            async for token in job.stream:
                n += 1
                sampled = self._token(job, token.index)
                ids = [sampled] if token_ids else None
                yield protocol.sse(
                    chunk({"content": protocol.token_text(sampled)}, token.finish_reason, ids)
                )
            if include_usage:
                yield protocol.sse(
                    protocol.usage_chunk(
                        request_id=job.response_id,
                        obj="chat.completion.chunk",
                        created=created,
                        model=model,
                        prompt_tokens=job.prompt_tokens,
                        completion_tokens=n,
                    )
                )
            yield protocol.SSE_DONE
        except engine.EngineDeadError:
            yield protocol.sse(protocol.ApiError(503, "The engine stopped.").body())
        finally:
            job.stream.abort()


async def _api_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, protocol.ApiError):  # pragma: no cover - registered for ApiError only
        raise exc
    return JSONResponse(exc.body(), status_code=exc.status)


def build_app(settings: EmulatorSettings, *, clock: engine.Clock | None = None) -> Starlette:
    """The emulator as an ASGI app; its lifespan runs the engine loop.

    ``clock`` defaults to wall time sped up ``settings.time_scale`` times; tests pass
    an :class:`.engine.VirtualClock`.
    """
    service = _Service(
        settings, clock if clock is not None else engine.RealClock(settings.time_scale)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with service.engine.running():
            yield

    routes = [
        Route("/health", service.health, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/metrics", service.prometheus, methods=["GET"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
        Route("/v1/chat/completions", service.chat, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={protocol.ApiError: _api_error}
    )
    app.state.emulator = service
    return app


@contextlib.asynccontextmanager
async def serving(
    settings: EmulatorSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: engine.Clock | None = None,
) -> AsyncIterator[str]:
    """Serve the emulator with uvicorn in this event loop; yields its base URL.

    ``port=0`` takes a free port.
    """
    app = build_app(settings, clock=clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="tandem-emulator-uvicorn")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def in_process(
    settings: EmulatorSettings, *, clock: engine.Clock | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An ``httpx.AsyncClient`` talking to a fresh emulator through ASGITransport."""
    app = build_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as client:
            yield client

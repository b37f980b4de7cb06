"""The engine loop: the pure :class:`.Scheduler` driven on asyncio, spending time.

Each turn: land finished KV transfers, pick a batch, ``await clock.sleep(duration)``
(the GPU is busy), then hand the sampled tokens to the request streams. When
nothing can run, the loop waits for a new request or the next timer.

All times are *emulated* seconds, read from an injected :class:`Clock`:

* :class:`RealClock` maps them to wall time divided by ``time_scale`` (a step that
  a GPU would spend 30 ms on sleeps 3 ms with ``time_scale=10``; the latencies the
  engine reports, its ``vllm:`` metrics included, stay in GPU seconds);
* :class:`VirtualClock` does not sleep at all: ``sleep`` moves its time forward and
  yields once. That is exact while the engine loop is the only sleeper, which is
  how tests use it: submit requests, then let the loop run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from tandem.workers.emulator import scheduling

__all__ = ["Clock", "Engine", "EngineObserver", "RealClock", "RequestStream", "VirtualClock"]

logger = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> float:
        """Emulated seconds (monotonic)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Let ``seconds`` of emulated time pass."""
        ...


class RealClock:
    """Wall time, sped up ``time_scale`` times."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.time_scale = time_scale

    def now(self) -> float:
        return time.monotonic() * self.time_scale

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.time_scale)


class VirtualClock:
    """Time that jumps: ``sleep`` advances it at once (deterministic, instant tests)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        self._now += max(0.0, seconds)
        await asyncio.sleep(0)


class EngineObserver(Protocol):
    """What the loop reports to (the metrics)."""

    def record(self, step: scheduling.Step, result: scheduling.StepResult) -> None: ...

    def record_transfers(self, transfers: Iterable[scheduling.TransferDone]) -> None: ...


class RequestStream:
    """The tokens of one request, as they are sampled; ends when it finishes.

    ``abort()`` (idempotent, a no-op once finished) takes the request out of the
    engine and frees its KV: call it in a ``finally`` around the iteration.
    """

    def __init__(self, engine: Engine, request_id: str) -> None:
        self.request_id = request_id
        self.finished: scheduling.FinishedRequest | None = None
        """Set when the request ended normally."""
        self._engine = engine
        self._queue: asyncio.Queue[scheduling.TokenEvent | BaseException | None] = asyncio.Queue()
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> scheduling.TokenEvent:
        if self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self._closed = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        return item

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.abort(self.request_id)

    def _put(self, item: scheduling.TokenEvent | BaseException | None) -> None:
        self._queue.put_nowait(item)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; requests cannot be served."""


class Engine:
    """One emulated vLLM engine core."""

    def __init__(
        self,
        config: scheduling.SchedulerConfig,
        *,
        clock: Clock | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.scheduler = scheduling.Scheduler(config)
        self.clock: Clock = clock if clock is not None else RealClock()
        self._observer = observer
        self._streams: dict[str, RequestStream] = {}
        self._wakeup = asyncio.Event()
        self.error: BaseException | None = None
        """Why the loop died, if it did."""

    def stats(self) -> scheduling.SchedulerStats:
        return self.scheduler.stats()

    def submit(self, spec: scheduling.RequestSpec) -> RequestStream:
        """Queue a request; raises ValueError if it can never fit the engine."""
        if self.error is not None:
            raise EngineDeadError("the engine loop has stopped") from self.error
        self.scheduler.add(spec, self.clock.now())
        stream = RequestStream(self, spec.request_id)
        self._streams[spec.request_id] = stream
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> bool:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(None)
        return self.scheduler.abort(request_id)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Engine]:
        """Run the loop as a task for the duration of the block."""
        task = asyncio.create_task(self.run(), name="tandem-emulator-engine")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        try:
            while True:
                await self._turn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("emulated engine loop died")
            self.error = exc
            for request_id, stream in list(self._streams.items()):
                stream._put(EngineDeadError("the engine loop has stopped"))
                self.scheduler.abort(request_id)
            self._streams.clear()
            raise

    async def _turn(self) -> None:
        clock, scheduler = self.clock, self.scheduler
        now = clock.now()
        transfers = scheduler.advance(now)
        if transfers and self._observer is not None:
            self._observer.record_transfers(transfers)
        step = scheduler.schedule(now)
        if step is None:
            wake = scheduler.next_event_time()
            await self._idle(None if wake is None else wake - now)
            return
        await clock.sleep(step.duration)
        result = scheduler.complete(step, clock.now())
        if self._observer is not None:
            self._observer.record(step, result)
        for token in result.tokens:
            stream = self._streams.get(token.request_id)
            if stream is not None:
                stream._put(token)
        for finished in result.finished:
            stream = self._streams.pop(finished.request_id, None)
            if stream is not None:
                stream.finished = finished
                stream._put(None)

    async def _idle(self, delay: float | None) -> None:
        """Wait for a new request, or ``delay`` emulated seconds if given."""
        self._wakeup.clear()
        if delay is None:
            await self._wakeup.wait()
            return
        waiters = {
            asyncio.ensure_future(self.clock.sleep(delay)),
            asyncio.ensure_future(self._wakeup.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

"""The router's bounded queue: admit, hold, or refuse with 429.

A request is admitted while the pool's in-flight requests are under its capacity
(``maxInFlightPerEndpoint`` times the decode workers known); otherwise it waits, in
arrival order, while fewer than ``maxQueuedRequests`` wait; past that it is refused
(:class:`~tandem.router.errors.OverloadedError`, 429 with Retry-After). A wait is bounded
(:class:`~tandem.router.errors.QueueTimeoutError`). Admission takes no await on the fast
path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from tandem.router import errors

__all__ = ["Admission"]


class Admission:
    def __init__(
        self, *, per_endpoint: int, max_queued: int, timeout: float, retry_after: int
    ) -> None:
        self._per_endpoint = per_endpoint
        self._max_queued = max_queued
        self._timeout = timeout
        self._retry_after = retry_after
        self._capacity = 0
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_endpoints(self, count: int) -> None:
        """The number of decode workers changed: so did the capacity."""
        self._capacity = count * self._per_endpoint
        self._wake()

    async def acquire(self) -> None:
        if self.active < self._capacity and not self._waiters:
            self.active += 1
            return
        if self._capacity == 0 and self._max_queued == 0:
            raise errors.NoWorkersError("no decode worker is available")
        if len(self._waiters) >= self._max_queued:
            raise errors.OverloadedError(
                "too many requests are waiting for a worker; retry later",
                retry_after=self._retry_after,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                await waiter  # the slot is handed over by release(): active already counts us
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # handed a slot just as the time ran out: take it
            raise errors.QueueTimeoutError(
                f"no worker became free within {self._timeout:g}s; retry later",
                retry_after=self._retry_after,
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot as we were cancelled: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self._capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

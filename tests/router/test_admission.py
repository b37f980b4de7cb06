"""The bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from tandem.router import admission, errors


def _gate(per_endpoint: int = 1, max_queued: int = 1, timeout: float = 5.0) -> admission.Admission:
    gate = admission.Admission(
        per_endpoint=per_endpoint, max_queued=max_queued, timeout=timeout, retry_after=7
    )
    gate.set_endpoints(1)
    return gate


async def test_admits_up_to_capacity_then_queues_then_refuses() -> None:
    gate = _gate(per_endpoint=2, max_queued=1)
    await gate.acquire()
    await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert gate.queued == 1
    with pytest.raises(errors.OverloadedError) as caught:
        await gate.acquire()
    assert caught.value.retry_after == 7
    assert caught.value.status == 429
    gate.release()
    await waiting  # handed the freed slot
    assert gate.active == 2
    assert gate.queued == 0


async def test_queue_wait_is_bounded() -> None:
    gate = _gate(timeout=0.01)
    await gate.acquire()
    with pytest.raises(errors.QueueTimeoutError):
        await gate.acquire()
    assert gate.queued == 0
    assert gate.active == 1


async def test_new_workers_admit_the_queue() -> None:
    gate = _gate(max_queued=5)
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    gate.set_endpoints(3)
    await asyncio.gather(*waiters)
    assert gate.active == 3


async def test_cancelled_waiter_leaves_the_queue() -> None:
    gate = _gate(max_queued=5)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.queued == 0
    gate.release()
    assert gate.active == 0


async def test_no_workers_and_no_queue_is_unavailable() -> None:
    gate = admission.Admission(per_endpoint=1, max_queued=0, timeout=1, retry_after=1)
    with pytest.raises(errors.NoWorkersError):
        await gate.acquire()

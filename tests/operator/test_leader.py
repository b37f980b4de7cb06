from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
from typing import Any

import pytest

from tandem.operator import client, kinds, leader
from tandem.operator.settings import LeaderElectionSettings

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def record(holder: str = "a", duration: float = 15, rv: str = "1") -> leader.Record:
    return leader.Record(holder, duration, "t", "t0", 2, rv)


@pytest.mark.parametrize(
    ("rec", "unchanged_for", "action"),
    [
        (None, 0, "create"),
        (record("me"), 0, "renew"),
        (record("me"), 100, "renew"),
        (record(""), 0, "take"),
        (record("other"), 14.9, "wait"),
        (record("other"), 15, "take"),
    ],
)
def test_decide(rec: leader.Record | None, unchanged_for: float, action: str) -> None:
    assert leader.decide(rec, "me", unchanged_for) == action


def test_lease_bodies() -> None:
    created = leader.lease_body("l", "ns", "me", T0, 15, None, "create")
    assert created["spec"] == {
        "holderIdentity": "me",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-01-01T00:00:00.000000Z",
        "renewTime": "2026-01-01T00:00:00.000000Z",
        "leaseTransitions": 0,
    }
    assert "resourceVersion" not in created["metadata"]
    later = T0 + datetime.timedelta(seconds=5)
    renewed = leader.lease_body("l", "ns", "me", later, 15, record("me"), "renew")
    assert renewed["spec"]["acquireTime"] == "t0"
    assert renewed["spec"]["leaseTransitions"] == 2
    assert renewed["metadata"]["resourceVersion"] == "1"
    taken = leader.lease_body("l", "ns", "me", later, 15.5, record("other"), "take")
    assert taken["spec"]["leaseTransitions"] == 3
    assert taken["spec"]["leaseDurationSeconds"] == 16
    assert taken["spec"]["acquireTime"] == "2026-01-01T00:00:05.000000Z"


def test_released_body() -> None:
    lease = leader.lease_body("l", "ns", "me", T0, 15, None, "create")
    released = leader.released_body(lease, T0)
    assert released["spec"]["holderIdentity"] == ""
    assert released["spec"]["leaseDurationSeconds"] == 1


class LeaseApi:
    """Leases with compare-and-swap on resourceVersion, like the API server."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self._rv = itertools.count(1)
        self.broken = False

    async def find(self, resource: kinds.Resource, namespace: str | None, name: str) -> Any:
        if self.broken:
            raise client.ApiError(0, "ConnectError", "down")
        return copy.deepcopy(self.lease)

    async def create(self, obj: dict[str, Any], *, field_manager: str) -> Any:
        if self.lease is not None:
            raise client.ConflictError(409, "AlreadyExists", "exists")
        self.lease = copy.deepcopy(obj)
        self.lease["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(self.lease)

    async def replace(self, obj: dict[str, Any], *, field_manager: str) -> Any:
        assert self.lease is not None
        if self.broken:
            raise client.ApiError(0, "ConnectError", "down")
        if obj["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise client.ConflictError(409, "Conflict", "stale")
        self.lease = copy.deepcopy(obj)
        self.lease["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(self.lease)


SETTINGS = LeaderElectionSettings(lease_duration=3, renew_deadline=0.2, retry_period=0.05)


def elector(api: LeaseApi, me: str, clock: list[float]) -> leader.LeaderElector:
    return leader.LeaderElector(
        api,  # type: ignore[arg-type]
        SETTINGS,
        "ns",
        me,
        monotonic=lambda: clock[0],
        clock=lambda: T0,
    )


async def test_first_candidate_leads_second_waits_until_the_lease_expires() -> None:
    api, clock = LeaseApi(), [0.0]
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a._attempt()
    assert a.is_leader
    assert not await b._attempt()
    clock[0] = 2.9
    assert not await b._attempt()
    clock[0] = 3.0  # a has not renewed for a whole lease duration, as b saw it
    assert await b._attempt()
    assert api.lease is not None
    assert api.lease["spec"]["holderIdentity"] == "b"
    assert api.lease["spec"]["leaseTransitions"] == 1
    assert not await a._attempt(), "a finds b holding a fresh lease"
    assert not a.is_leader


async def test_renewals_keep_the_lease() -> None:
    api, clock = LeaseApi(), [0.0]
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a._attempt()
    for step in range(1, 10):
        clock[0] = step * 1.0
        assert await a._attempt()
        assert not await b._attempt()


async def test_release_hands_over_at_once() -> None:
    api, clock = LeaseApi(), [0.0]
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a._attempt()
    await a.release()
    assert not a.is_leader
    assert await b._attempt()


async def test_acquire_returns_false_when_stopped() -> None:
    api, clock = LeaseApi(), [0.0]
    assert await elector(api, "a", clock)._attempt()
    stop = asyncio.Event()
    b = elector(api, "b", clock)
    task = asyncio.create_task(b.acquire(stop))
    await asyncio.sleep(0.12)
    stop.set()
    assert await asyncio.wait_for(task, 1) is False


async def test_hold_gives_up_when_renewal_fails_past_the_deadline() -> None:
    api = LeaseApi()
    a = leader.LeaderElector(api, SETTINGS, "ns", "a", clock=lambda: T0)  # type: ignore[arg-type]
    assert await a.acquire(asyncio.Event())
    api.broken = True
    with pytest.raises(leader.LeadershipLostError):
        await asyncio.wait_for(a.hold(asyncio.Event()), 2)


async def test_hold_returns_when_stopped() -> None:
    api = LeaseApi()
    a = leader.LeaderElector(api, SETTINGS, "ns", "a", clock=lambda: T0)  # type: ignore[arg-type]
    assert await a.acquire(asyncio.Event())
    stop = asyncio.Event()
    task = asyncio.create_task(a.hold(stop))
    await asyncio.sleep(0.15)
    stop.set()
    await asyncio.wait_for(task, 1)
    assert a.is_leader


async def test_release_retries_over_a_late_renewal() -> None:
    api, clock = LeaseApi(), [0.0]
    a = elector(api, "a", clock)
    assert await a._attempt()
    stale = a._lease
    assert await a._attempt()  # a renewal whose answer was lost: a holds an old version
    a._lease = stale
    await a.release()
    assert api.lease is not None
    assert api.lease["spec"]["holderIdentity"] == ""


async def test_release_leaves_a_successors_lease_alone() -> None:
    api, clock = LeaseApi(), [0.0]
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert await a._attempt()
    stale = a._lease
    clock[0] = 10.0
    assert not await b._attempt()
    clock[0] = 20.0
    assert await b._attempt()
    a._lease = stale
    await a.release()
    assert api.lease is not None
    assert api.lease["spec"]["holderIdentity"] == "b"

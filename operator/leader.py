"""Leader election on a coordination.k8s.io Lease, as client-go does it.

Two operator replicas must not both reconcile. kopf's own peering cannot elect a
leader among replicas of one Deployment: operators of *equal* priority all freeze
(see kopf's "Peering" docs), and it needs extra CRDs. So kopf runs
``standalone`` and only in the process holding the Lease; the others wait.

- A candidate takes the Lease when nobody holds it, or when its record has not
  changed for ``leaseDurationSeconds`` *as observed locally* (monotonic clock,
  so clock skew between nodes does not matter).
- The leader renews every ``retry_period``; if it cannot renew for
  ``renew_deadline`` it stops reconciling and the process exits (the kubelet
  restarts it as a candidate): a leader that may have lost the Lease must not
  go on writing.
- On a clean shutdown the leader releases the Lease, so a successor takes over
  within one ``retry_period`` instead of a whole ``lease_duration``.

Every write is a compare-and-swap on ``resourceVersion``: two candidates racing
for the Lease get one success and one 409.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from . import client, kinds
from .settings import LeaderElectionSettings

logger = logging.getLogger(__name__)

FIELD_MANAGER = "tandem-operator"
Action = Literal["create", "renew", "take", "wait"]


class LeadershipLostError(RuntimeError):
    """The Lease could not be renewed in time: stop reconciling now."""


def microtime(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Record:
    """The parts of a Lease that leader election reads."""

    holder: str
    duration: float
    renew_time: str | None
    acquire_time: str | None
    transitions: int
    resource_version: str | None

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> Record:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration=float(spec.get("leaseDurationSeconds") or 0),
            renew_time=spec.get("renewTime"),
            acquire_time=spec.get("acquireTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=(lease.get("metadata") or {}).get("resourceVersion"),
        )

    @property
    def version(self) -> tuple[str, str | None, str | None]:
        """What changes whenever the holder renews or changes."""
        return self.holder, self.renew_time, self.resource_version


def decide(record: Record | None, me: str, unchanged_for: float) -> Action:
    """What a candidate does with the Lease as it found it.

    ``unchanged_for``: seconds this exact record has been observed unchanged.
    """
    if record is None:
        return "create"
    if record.holder == me:
        return "renew"
    if not record.holder or unchanged_for >= record.duration:
        return "take"
    return "wait"


def lease_body(
    name: str,
    namespace: str,
    me: str,
    now: datetime.datetime,
    duration: float,
    record: Record | None,
    action: Action,
) -> dict[str, Any]:
    """The Lease to write for ``action`` (``create``, ``renew`` or ``take``)."""
    stamp = microtime(now)
    acquired = stamp if action != "renew" or record is None else record.acquire_time or stamp
    transitions = record.transitions if record is not None else 0
    if action == "take" and record is not None and record.holder:
        transitions += 1
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if record is not None and record.resource_version:
        meta["resourceVersion"] = record.resource_version
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {
            "holderIdentity": me,
            "leaseDurationSeconds": max(1, math.ceil(duration)),
            "acquireTime": acquired,
            "renewTime": stamp,
            "leaseTransitions": transitions,
        },
    }


def released_body(lease: Mapping[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """The Lease given up: no holder, expiring at once."""
    spec = dict(lease.get("spec") or {})
    spec.update({"holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": microtime(now)})
    return {**lease, "spec": spec}


class LeaderElector:
    def __init__(
        self,
        kube: client.Kube,
        settings: LeaderElectionSettings,
        namespace: str,
        identity: str,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._kube = kube
        self._settings = settings
        self._namespace = namespace
        self.identity = identity
        self._monotonic = monotonic
        self._clock = clock
        self._seen: tuple[tuple[str, str | None, str | None], float] | None = None
        self._lease: dict[str, Any] | None = None
        self._renewed_at: float | None = None

    @property
    def is_leader(self) -> bool:
        return self._lease is not None

    async def _attempt(self) -> bool:
        """One try to acquire or renew; True when this process holds the Lease after it."""
        name = self._settings.lease_name
        try:
            found = await self._kube.find(kinds.LEASES, self._namespace, name)
        except client.ApiError as exc:
            logger.warning("Cannot read the Lease %s/%s: %s", self._namespace, name, exc)
            return False
        record = Record.of(found) if found is not None else None
        now = self._monotonic()
        if record is not None and (self._seen is None or self._seen[0] != record.version):
            self._seen = (record.version, now)
        unchanged_for = now - self._seen[1] if record is not None and self._seen else 0.0
        action = decide(record, self.identity, unchanged_for)
        if action == "wait":
            self._lease = None
            return False
        body = lease_body(
            name,
            self._namespace,
            self.identity,
            self._clock(),
            self._settings.lease_duration,
            record,
            action,
        )
        try:
            if action == "create":
                lease = await self._kube.create(body, field_manager=FIELD_MANAGER)
            else:
                lease = await self._kube.replace(body, field_manager=FIELD_MANAGER)
        except client.ApiError as exc:
            # 409: someone else wrote first; we read again on the next attempt.
            level = logging.DEBUG if isinstance(exc, client.ConflictError) else logging.WARNING
            logger.log(level, "Cannot %s the Lease %s/%s: %s", action, self._namespace, name, exc)
            if action != "renew":
                self._lease = None
            return False
        if action != "renew":
            logger.info(
                "Became the leader (Lease %s/%s, identity %s)", self._namespace, name, self.identity
            )
        self._lease = lease
        self._renewed_at = now
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process leads (True) or ``stop`` is set (False)."""
        logged = False
        while not stop.is_set():
            if await self._attempt():
                return True
            if not logged:
                logger.info(
                    "Waiting to lead: the Lease %s/%s is held by another replica",
                    self._namespace,
                    self._settings.lease_name,
                )
                logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.retry_period)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew until ``stop`` is set; :class:`LeadershipLostError` when renewal fails too long."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self._settings.retry_period)
                return
            except TimeoutError:
                pass
            try:
                renewed = await asyncio.wait_for(self._attempt(), self._settings.renew_deadline)
            except TimeoutError:
                renewed = False
            if renewed:
                continue
            since = self._monotonic() - (self._renewed_at or 0.0)
            if not self.is_leader or since > self._settings.renew_deadline:
                self._lease = None
                raise LeadershipLostError(
                    f"could not renew the Lease {self._namespace}/{self._settings.lease_name} "
                    f"for {since:.0f} s"
                )

    async def release(self) -> None:
        """Give the Lease up if this process holds it (best effort)."""
        lease, self._lease = self._lease, None
        name = self._settings.lease_name
        for _ in range(3):
            if lease is None or Record.of(lease).holder != self.identity:
                return
            try:
                await self._kube.replace(
                    released_body(lease, self._clock()), field_manager=FIELD_MANAGER
                )
                logger.info("Released the Lease %s/%s", self._namespace, name)
                return
            except client.ConflictError:
                # A renewal landed after our last read: read again and retry.
                try:
                    lease = await self._kube.find(kinds.LEASES, self._namespace, name)
                except client.ApiError as exc:
                    logger.warning("Cannot release the Lease: %s", exc)
                    return
            except client.ApiError as exc:
                logger.warning("Cannot release the Lease: %s", exc)
                return

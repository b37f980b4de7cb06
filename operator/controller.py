"""The I/O around :mod:`.reconcile`: observe a pool's children, write, report.

One :class:`Controller` serves every pool. Reconciles of the same pool are
serialized (a create/update handler, the drift timer and a child's watch event
may all want one at once); different pools run concurrently.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import api, applying, client, conditions, kinds, planning, reporting, validation
from . import reconcile as decisions

K8sObject = dict[str, Any]
Clock = Callable[[], datetime.datetime]

_log = logging.getLogger(__name__)


class PoolLogger(logging.LoggerAdapter[logging.Logger]):
    """Log lines about one pool, prefixed ``[namespace/name]`` as kopf's are."""

    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(_log, {"pool": f"{namespace}/{name}"})

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{(self.extra or {}).get('pool')}] {msg}", kwargs


Logger = logging.Logger | logging.LoggerAdapter[Any]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Notice:
    """Something worth a Kubernetes Event on the pool."""

    type: str
    """``Normal`` or ``Warning``."""
    reason: str
    message: str


@dataclass
class Report:
    """What one reconcile did."""

    notices: list[Notice] = field(default_factory=list)
    problems: list[conditions.Problem] = field(default_factory=list)
    status_written: bool = False
    retry: bool = False
    """A write failed for a reason that may pass (the handler should retry soon)."""

    @property
    def changed(self) -> bool:
        return any(n.type == "Normal" for n in self.notices)


_VERB = {"missing": "Created", "outdated": "Updated", "drifted": "Restored"}


class Controller:
    def __init__(
        self,
        kube: client.Kube,
        plan_settings: planning.PlanSettings,
        clock: Clock = utc_now,
    ) -> None:
        self._kube = kube
        self._plan_settings = plan_settings
        self._clock = clock
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    @property
    def plan_settings(self) -> planning.PlanSettings:
        return self._plan_settings

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """Drop the lock of a pool that is gone."""
        lock = self._locks.get((namespace, name))
        if lock is not None and not lock.locked():
            del self._locks[(namespace, name)]

    async def reconcile_named(
        self, namespace: str, name: str, logger: Logger | None = None
    ) -> tuple[K8sObject, Report] | None:
        """Reconcile a pool read fresh from the API; None when it is gone or going."""
        body = await self._kube.find(kinds.POOLS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        return body, await self.reconcile(body, logger)

    async def reconcile(self, body: Mapping[str, Any], logger: Logger | None = None) -> Report:
        meta = body["metadata"]
        namespace = meta.get("namespace") or "default"
        logger = logger or PoolLogger(namespace, meta["name"])
        async with self._lock(namespace, meta["name"]):
            try:
                pool = validation.parse_pool(body)
            except validation.InvalidPoolError as exc:
                return await self._report_invalid(body, exc, logger)
            return await self._reconcile(pool, body, logger)

    async def _report_invalid(
        self, body: Mapping[str, Any], exc: validation.InvalidPoolError, logger: Logger
    ) -> Report:
        message = "; ".join(f"{p.path}: {p.message}" if p.path else p.message
                            for p in exc.problems)  # fmt: skip
        report = Report(problems=[conditions.Problem("InvalidSpec", message)])
        report.notices.append(Notice("Warning", "InvalidSpec", message))
        current = body.get("status") or {}
        wanted = conditions.invalid_status(
            int(body["metadata"].get("generation") or 0), message, current, rfc3339(self._clock())
        )
        logger.error("Invalid spec: %s", message)
        await self._write_status(body, wanted, current, report, logger)
        return report

    async def _observe(self, pool: api.InferencePool) -> dict[decisions.Key, K8sObject]:
        selector = f"{planning.LABEL_POOL}={pool.name}"
        lists = await asyncio.gather(
            *(self._kube.list(r, pool.namespace, label_selector=selector) for r in kinds.CHILDREN)
        )
        return {applying.key(obj): obj for items in lists for obj in items}

    async def _reconcile(
        self,
        pool: api.InferencePool,
        body: Mapping[str, Any],
        logger: Logger,
    ) -> Report:
        report = Report()
        desired = planning.plan(pool, self._plan_settings)
        by_key = {applying.key(o): o for o in desired}
        try:
            live = await self._observe(pool)
            # A planned child missing from the labelled ones may still exist under its
            # name (a stranger's object, or ours with its labels edited away).
            for k, obj in by_key.items():
                if k not in live:
                    found = await self._kube.find(kinds.of(obj), pool.namespace, k[1])
                    if found is not None:
                        live[k] = found
        except client.ApiError as exc:
            report.retry = exc.temporary
            report.problems.append(conditions.Problem("ObserveFailed", str(exc)))
            logger.error("Cannot read the children: %s", exc)
            return report

        decision = decisions.decide(pool, desired, live)
        report.problems += decision.conflicts
        for problem in decision.conflicts:
            report.notices.append(Notice("Warning", problem.reason, problem.message))
            logger.warning("%s", problem.message)
        await self._execute(decision, by_key, live, report, logger)

        current = body.get("status") or {}
        obs = decisions.observation(pool, live, report.problems)
        wanted = conditions.status(obs, current, rfc3339(self._clock()))
        await self._write_status(body, wanted, current, report, logger)
        return report

    async def _execute(
        self,
        decision: decisions.Decision,
        desired: Mapping[decisions.Key, K8sObject],
        live: dict[decisions.Key, K8sObject],
        report: Report,
        logger: Logger,
    ) -> None:
        not_handed: set[decisions.Key] = set()
        for handover in decision.handovers:
            k = applying.key(handover)
            try:
                live[k] = await self._kube.apply(
                    handover, field_manager=applying.AUTOSCALER_FIELD_MANAGER
                )
                logger.debug("Handed spec.replicas of %s %s to the autoscaler", *k)
            except client.ApiError as exc:
                self._failed(report, logger, f"hand over the replicas of {k[0]} {k[1]}", exc)
                not_handed.add(k)
        for action in decision.applies:
            k = action.key
            if k in not_handed:
                continue  # applying without replicas now would reset them to 1
            before = live.get(k)
            try:
                result = await self._kube.apply(
                    action.obj, field_manager=applying.FIELD_MANAGER, force=True
                )
            except client.ApiError as exc:
                self._failed(report, logger, f"apply {k[0]} {k[1]}", exc)
                continue
            live[k] = result
            rv_before = (before or {}).get("metadata", {}).get("resourceVersion")
            if action.why in _VERB and result["metadata"].get("resourceVersion") != rv_before:
                verb = _VERB[action.why]
                message = f"{verb} {k[0]} {k[1]}"
                if action.why == "drifted":
                    message += " (it was changed outside the operator)"
                report.notices.append(Notice("Normal", verb, message))
                logger.info("%s", message)
            if before is None:
                await self._execute(
                    decisions.after_create(desired[k], result), desired, live, report, logger
                )
        for prune in decision.prunes:
            k = (prune.resource.kind, prune.name)
            try:
                deleted = await self._kube.delete(
                    prune.resource, prune.namespace, prune.name, uid=prune.uid
                )
            except client.ApiError as exc:
                self._failed(report, logger, f"delete {k[0]} {k[1]}", exc)
                continue
            live.pop(k, None)
            if deleted:
                message = f"Deleted {k[0]} {k[1]} (no longer in the plan)"
                report.notices.append(Notice("Normal", "Deleted", message))
                logger.info("%s", message)

    @staticmethod
    def _failed(
        report: Report,
        logger: Logger,
        what: str,
        exc: client.ApiError,
    ) -> None:
        message = f"Cannot {what}: {exc}"
        if isinstance(exc, client.ForbiddenError) and "being terminated" in exc.message:
            # The namespace is going away, and the pool with it.
            logger.debug("%s", message)
            return
        report.retry = report.retry or exc.temporary
        report.problems.append(conditions.Problem("ApplyFailed", message))
        report.notices.append(Notice("Warning", "ApplyFailed", message))
        logger.error("%s", message)

    async def _write_status(
        self,
        body: Mapping[str, Any],
        wanted: Mapping[str, Any],
        current: Mapping[str, Any],
        report: Report,
        logger: Logger,
    ) -> None:
        if not reporting.changed(wanted, current):
            return
        try:
            await self._kube.apply(
                decisions.status_object(body, wanted),
                field_manager=applying.FIELD_MANAGER,
                force=True,
                subresource="status",
            )
        except client.ApiError as exc:
            report.retry = report.retry or exc.temporary
            logger.warning("Cannot write the status: %s", exc)
            return
        report.status_written = True

"""The autoscaler: the I/O shell around :func:`tandem.autoscaling.planner.decide`.

One kopf daemon per pool (handler id ``autoscale``; a daemon rather than a timer
because the period is the pool's own ``spec.autoscaling.interval``, re-read
before every sleep, while a kopf timer's interval is fixed at registration).
Each tick:

1. reads the pool's worker Deployments (``spec.replicas``, ``status.readyReplicas``);
2. reads the signals from its source: by default the pool's own pods, whose
   ``/metrics`` it scrapes (:mod:`tandem.autoscaling.embedded`; it finds them in
   the EndpointSlices of the pool's Services), or Prometheus
   (:mod:`tandem.autoscaling.prometheus`) when ``--prometheus-url`` is given; both
   also tell which workers are still warming up, so no Pod has to be read;
3. calls ``decide(spec, inputs, state, now)`` with the state of the last tick;
4. writes each changed size by server-side apply of ``{"spec": {"replicas": n}}``
   on the Deployment, field manager ``tandem-autoscaler`` (the manager the
   operator hands ``spec.replicas`` to right after creating a worker);
5. applies its part of the pool's status to the status subresource under the
   same field manager: per role ``lastDecision``, ``observed`` latencies and
   queue, ``slo`` (the share of recent requests that met the objectives, as the
   pool's routers counted them), and the conditions ``MetricsAvailable``,
   ``ScalingLimited`` and ``SLOAttained`` (conditions are a map keyed by type, so
   the operator's Ready, Progressing and Degraded are never touched);
   ``desiredReplicas`` stays the operator's (it mirrors the Deployment's
   ``spec.replicas``);
6. returns the Events to post: one per size change, with the planner's reason
   ("prefill 2→3: TTFT p90 820ms > 500ms"), and a warning when metrics go missing.

``policy: external`` runs the same tick, but the planner decides nothing and
nothing is written to a Deployment. Missing metrics (Prometheus down, a metric
not exposed, no worker scraped) make the planner hold every size; the pool then
says ``MetricsAvailable=False`` with the reason. With ``--metrics-source=off`` the
autoscaler is off: each pool says so once (``MetricsAvailable=False``,
``AutoscalerDisabled``) and its replicas stay where they are.

**State.** The planner's memory (:class:`~tandem.autoscaling.planner.PlannerState`) lives in
this process, per pool. After a restart or a leader change it is rebuilt from
the status: the times of the last scale-up and scale-down come from the roles'
``lastDecision`` (so cooldowns still hold), while the history of
recommendations starts empty, so a scale needs its whole stabilization window
of evidence again. That errs on the side of holding; nothing else is persisted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pydantic

from tandem.autoscaling import embedded, planner, prometheus, signals
from tandem.operator import (
    api,
    applying,
    client,
    controller,
    kinds,
    planning,
    reconcile,
    reporting,
    validation,
)

__all__ = [
    "FIELD_MANAGER",
    "Autoscaler",
    "AutoscalerSettings",
    "Tick",
    "disabled_status",
    "restore",
    "slo_status",
    "status",
]

FIELD_MANAGER = applying.AUTOSCALER_FIELD_MANAGER
CONDITIONS = ("MetricsAvailable", "ScalingLimited", "SLOAttained")
DEFAULT_INTERVAL = 15.0

_log = logging.getLogger(__name__)

K8sObject = dict[str, Any]
Clock = Callable[[], datetime.datetime]


MetricsSourceKind = Literal["auto", "prometheus", "embedded", "off"]


@dataclass(frozen=True)
class AutoscalerSettings:
    """Where the signals come from (``tandem operator --metrics-source``)."""

    prometheus_url: str | None = None
    """Base URL of the Prometheus HTTP API."""
    prometheus_timeout: float = 5.0
    """Seconds each query may take."""
    metrics_source: MetricsSourceKind = "auto"
    """``auto``: Prometheus when a URL is given, else the embedded source (the
    operator scrapes the pool's pods itself); ``off``: the autoscaler is off."""

    @property
    def kind(self) -> Literal["prometheus", "embedded", "off"]:
        if self.metrics_source == "auto":
            return "prometheus" if self.prometheus_url else "embedded"
        return self.metrics_source

    @property
    def enabled(self) -> bool:
        return self.kind != "off"

    def source(self, kube: Lister | None = None) -> SignalSource | None:
        """The source to read pools with (``kube`` lists EndpointSlices for the
        embedded one); None when the autoscaler is off."""
        if self.kind == "prometheus":
            if not self.prometheus_url:
                raise ValueError("the prometheus metrics source needs --prometheus-url")
            return prometheus.Source(
                prometheus.SourceSettings(
                    url=self.prometheus_url.rstrip("/"), timeout=self.prometheus_timeout
                )
            )
        if self.kind == "embedded":
            if kube is None:
                raise ValueError("the embedded metrics source needs the API client")
            return embedded.Source(pod_endpoints(kube))
        return None


class Lister(Protocol):
    """Lists objects by label (:class:`.client.Kube` does)."""

    async def list(
        self, resource: kinds.Resource, namespace: str | None, *, label_selector: str = ""
    ) -> list[K8sObject]: ...


_PORTS = {"prefill": planning.WORKER_PORT, "decode": planning.WORKER_PORT,
          "router": planning.ROUTER_PORT}  # fmt: skip


def pod_endpoints(kube: Lister) -> embedded.Endpoints:
    """Where a pool's ready pods are, from the EndpointSlices of its Services (the
    same objects the router watches; the operator may read them already)."""

    async def endpoints(namespace: str | None, pool: str, component: str) -> list[str]:
        service = f"{pool}-{component}"
        slices = await kube.list(
            kinds.ENDPOINT_SLICES, namespace, label_selector=f"kubernetes.io/service-name={service}"
        )
        urls = []
        for item in slices:
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for address in endpoint.get("addresses") or []:
                    host = f"[{address}]" if ":" in address else address
                    urls.append(f"http://{host}:{_PORTS[component]}")
        return urls

    return endpoints


class KubeApi(Protocol):
    """The calls the autoscaler makes (:class:`.client.Kube` has them)."""

    async def find(
        self, resource: kinds.Resource, namespace: str | None, name: str
    ) -> K8sObject | None: ...

    async def apply(
        self,
        obj: Mapping[str, Any],
        *,
        field_manager: str,
        force: bool = False,
        subresource: str | None = None,
    ) -> K8sObject: ...


class Stopped(Protocol):
    """kopf's daemon flag: truthy once the daemon should stop."""

    def __bool__(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Awaitable[Any]: ...


class SignalSource(Protocol):
    """Where readings come from (:class:`.prometheus.Source` is one)."""

    async def read_pool(
        self,
        spec: planner.PlannerSpec,
        pool: str,
        roles: tuple[planner.Role, ...],
        *,
        window: float,
        warmup: float,
        namespace: str | None = None,
    ) -> dict[planner.Role, signals.Reading]: ...

    def forget(self, namespace: str | None, pool: str) -> None:
        """Drop what is kept of a deleted pool."""
        ...


# ---------------------------------------------------------------------------
# Pure: state and status


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def restore(status: Mapping[str, Any]) -> planner.PlannerState:
    """The planner's state after a restart: the last scale times from ``lastDecision``."""
    roles: dict[str, planner.RoleState] = {}
    for role in ("prefill", "decode"):
        last = ((status.get(role) or {}).get("lastDecision")) or {}
        at = _parse_time(last.get("time"))
        before, after = last.get("fromReplicas"), last.get("toReplicas")
        state = planner.RoleState()
        if at is not None and isinstance(before, int) and isinstance(after, int):
            if after > before:
                state = dataclasses.replace(state, last_scale_up=at)
            elif after < before:
                state = dataclasses.replace(state, last_scale_down=at)
        roles[role] = state
    return planner.PlannerState(prefill=roles["prefill"], decode=roles["decode"])


MetricsReason = planner.Cause | Literal["Measured", "AutoscalerDisabled"]
"""The ``MetricsAvailable`` condition's reasons: why the signals are missing (chosen
where that was found: :class:`~tandem.autoscaling.planner.MetricsUnavailable`), or
that they were measured, or that the autoscaler is off."""

_OWN_MAPS = ("observed", "slo")
"""Status maps the autoscaler alone writes: a key it stops sending is a change."""

_LIMIT_REASONS: Mapping[planner.Limit, str] = {
    "max": "AtMaxReplicas",
    "min": "AtMinReplicas",
    "step": "StepLimited",
    "gpu-budget": "GpuBudget",
}


def _metrics_available(
    ok: bool,
    reason: MetricsReason,
    message: str,
    generation: int,
    previous: Mapping[str, Any],
    now: str,
) -> api.Condition:
    return reporting.condition(
        "MetricsAvailable", ok, reason, message,
        generation=generation, previous=previous.get("conditions") or [], now=now,
    )  # fmt: skip


def _kept_decisions(previous: Mapping[str, Any]) -> dict[str, api.ScalingDecision]:
    # Fields this manager stops applying are removed by the API server: the last
    # decisions are sent again with every write.
    out: dict[str, api.ScalingDecision] = {}
    for role in ("prefill", "decode"):
        last = (previous.get(role) or {}).get("lastDecision")
        if not last:
            continue
        try:
            out[role] = api.ScalingDecision.model_validate(last)
        except pydantic.ValidationError:
            continue  # not what this manager writes (the schema would have refused it)
    return out


def _status(
    decisions: Mapping[str, api.ScalingDecision],
    conditions: list[api.Condition],
    observed: api.ObservedLatency | None = None,
    slo: api.SloStatus | None = None,
) -> dict[str, Any]:
    # Only what is passed is written (see reporting.dump): a role without a decision
    # and an empty ``observed`` are left out, not sent as defaults.
    given: dict[str, Any] = {role: api.RoleStatus(last_decision=d) for role, d in decisions.items()}
    if observed is not None:
        given["observed"] = observed
    if slo is not None:
        given["slo"] = slo
    return reporting.dump(api.InferencePoolStatus(conditions=conditions, **given))


def disabled_status(generation: int, previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    """What a pool says when the operator's autoscaler is off."""
    message = (
        "the operator runs with --metrics-source=off (chart value autoscaling.metricsSource): "
        "autoscaling is off and worker replicas stay as they are"
    )
    available = _metrics_available(False, "AutoscalerDisabled", message, generation, previous, now)
    return _status(_kept_decisions(previous), [available])


def _observed(
    readings: Mapping[planner.Role, signals.Reading],
) -> api.ObservedLatency | None:
    def value(role: planner.Role, signal: str) -> float | None:
        reading = readings.get(role)
        if reading is None or isinstance(reading.metrics, planner.MetricsUnavailable):
            return None
        got = getattr(reading.metrics, signal)
        return None if got is None else float(got)

    ttft = value("prefill", "ttft")
    if ttft is None:
        ttft = value("decode", "ttft")
    tpot = value("decode", "tpot")
    queues = [value(r, "queue_depth") for r in readings]
    queue = None
    if queues and all(q is not None for q in queues):
        queue = round(sum(q for q in queues if q is not None), 3)
    if ttft is None and tpot is None and queue is None:
        return None
    return api.ObservedLatency(
        ttft=None if ttft is None else api.format_duration(ttft),
        ttft_seconds=None if ttft is None else round(ttft, 4),
        tpot=None if tpot is None else api.format_duration(tpot),
        tpot_seconds=None if tpot is None else round(tpot, 4),
        queue_depth=queue,
    )


def _percent(share: float) -> str:
    # Rounded down: 100.0% only when every request met the objectives.
    return f"{math.floor(share * 1000 + 1e-9) / 10:.1f}%"


def slo_status(
    readings: Mapping[planner.Role, signals.Reading],
    objective: api.SloSpec,
    generation: int,
    previous: Mapping[str, Any],
    now: str,
) -> tuple[api.SloStatus | None, api.Condition]:
    """``status.slo`` and the ``SLOAttained`` condition, from the decode reading (which
    carries the pool's attainment, see ``signals``)."""
    reading = readings.get("decode")
    snap = reading.snapshot if reading is not None else None
    window = api.format_duration(api.parse_duration(objective.attainment_window))
    requests = None if snap is None else snap.attainment_requests
    conditions = previous.get("conditions") or []
    if snap is None or requests is None:
        message = (
            "no router of the pool reports SLO attainment (tandem_router_slo_requests): "
            "not scraped yet, or started without slo settings"
        )
        return None, _unknown("SLOAttained", "NotMeasured", message, generation, conditions, now)
    both = snap.attainment_both
    if requests == 0 or both is None:
        status = api.SloStatus(requests=requests, window=window)
        message = f"no request finished in the last {window}"
        return status, _unknown("SLOAttained", "NoTraffic", message, generation, conditions, now)

    def share(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    status = api.SloStatus(
        attainment=api.SloAttainment(
            ttft=share(snap.attainment_ttft), tpot=share(snap.attainment_tpot), both=share(both)
        ),
        requests=requests,
        window=window,
        summary=_percent(both),
    )
    target = f"p{objective.percentile:g}"
    met = (
        f"{_percent(both)} of the last {window}'s {requests:,} requests met both objectives "
        f"(TTFT ≤ {objective.ttft}, TPOT ≤ {objective.tpot})"
    )
    ok = both >= objective.percentile / 100
    reason, message = (
        ("AtObjective", f"{met}, at the {target} objective")
        if ok
        else ("BelowObjective", f"{met}, under the {target} objective")
    )
    return status, reporting.condition(
        "SLOAttained", ok, reason, message,
        generation=generation, previous=conditions, now=now,
    )  # fmt: skip


def _unknown(
    type_: api.ConditionType,
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> api.Condition:
    # reporting.condition says True or False; the transition time follows the same rule.
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == "Unknown" else None
    return api.Condition(
        type=type_,
        status="Unknown",
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=since or now,
    )


def status(
    plan: planner.Plan,
    readings: Mapping[planner.Role, signals.Reading],
    generation: int,
    previous: Mapping[str, Any],
    now: str,
    objective: api.SloSpec | None = None,
) -> dict[str, Any]:
    """The fields of ``status`` the autoscaler owns, after a tick (``objective``: the
    pool's ``spec.slo``, for ``status.slo`` and ``SLOAttained``; None: neither)."""
    decisions = _kept_decisions(previous)
    for d in plan.decisions:
        if d.changed and d.replicas is not None:
            why = d.reason.split(": ", 1)[1] if ": " in d.reason else d.reason
            decisions[d.role] = api.ScalingDecision(
                time=now, from_replicas=d.current, to_replicas=d.replicas, reason=why
            )
    unavailable = [
        (role, r.metrics)
        for role, r in readings.items()
        if isinstance(r.metrics, planner.MetricsUnavailable)
    ]
    if unavailable:
        missing = "; ".join(f"{role}: {m.reason}" for role, m in unavailable)
        available = _metrics_available(
            False, unavailable[0][1].cause, f"{missing}; holding the current replicas",
            generation, previous, now,
        )  # fmt: skip
    else:
        seen = ", ".join(f"{role} {r.warm}/{r.targets} warm" for role, r in readings.items())
        available = _metrics_available(
            True, "Measured", f"workers scraped: {seen}", generation, previous, now
        )
    limited = [(d, d.limited_by) for d in plan.decisions if d.limited_by is not None]
    if limited:
        ok, reason = True, _LIMIT_REASONS[limited[0][1]]
        message = "; ".join(d.reason for d, _ in limited)
    else:
        ok, reason, message = False, "WithinBounds", ""
    scaling = reporting.condition(
        "ScalingLimited", ok, reason, message,
        generation=generation, previous=previous.get("conditions") or [], now=now,
    )  # fmt: skip
    if objective is None:
        return _status(decisions, [available, scaling], _observed(readings))
    slo, attained = slo_status(readings, objective, generation, previous, now)
    return _status(decisions, [available, scaling, attained], _observed(readings), slo)


def notices(
    plan: planner.Plan, wanted: Mapping[str, Any], previous: Mapping[str, Any]
) -> list[controller.Notice]:
    """Events for a tick: each size change, and metrics going missing."""
    out = [
        controller.Notice(
            "Normal", "ScaledUp" if d.action == "scale-up" else "ScaledDown", d.reason
        )
        for d in plan.decisions
        if d.changed
    ]
    out += _metrics_notices(wanted, previous)
    return out


def _metrics_notices(
    wanted: Mapping[str, Any], previous: Mapping[str, Any]
) -> list[controller.Notice]:
    def available(status: Mapping[str, Any]) -> Mapping[str, Any]:
        conds = status.get("conditions") or []
        return next((c for c in conds if c.get("type") == "MetricsAvailable"), {})

    now, before = available(wanted), available(previous)
    if now.get("status") == "False" and (
        before.get("status") != "False" or before.get("reason") != now.get("reason")
    ):
        return [controller.Notice("Warning", str(now["reason"]), str(now["message"]))]
    return []


# ---------------------------------------------------------------------------
# I/O


@dataclass
class Tick:
    """What one tick did."""

    interval: float = DEFAULT_INTERVAL
    """Seconds until the next tick (the pool's ``autoscaling.interval``)."""
    plan: planner.Plan | None = None
    notices: list[controller.Notice] = field(default_factory=list)
    status_written: bool = False
    done: bool = False
    """Nothing more to do for this pool (the autoscaler is off and said so)."""


def _scale_object(deployment: Mapping[str, Any], replicas: int) -> K8sObject:
    meta = deployment["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": {"replicas": replicas},
    }


class Autoscaler:
    """Ticks every pool; keeps each pool's planner state between ticks."""

    def __init__(
        self,
        kube: KubeApi,
        source: SignalSource | None,
        *,
        clock: Clock = controller.utc_now,
        tunables: Mapping[str, float | None] | None = None,
    ) -> None:
        self._kube = kube
        self._source = source
        self._clock = clock
        self._tunables = dict(tunables or {})
        self._states: dict[tuple[str, str], planner.PlannerState] = {}

    @property
    def enabled(self) -> bool:
        return self._source is not None

    def forget(self, namespace: str, name: str) -> None:
        self._states.pop((namespace, name), None)
        if self._source is not None:
            self._source.forget(namespace, name)

    async def tick(self, body: Mapping[str, Any]) -> Tick:
        """One tick for one pool (see the module docstring)."""
        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        logger = controller.PoolLogger(namespace, name)
        previous: Mapping[str, Any] = body.get("status") or {}
        generation = int(meta.get("generation") or 0)
        now = self._clock()
        stamp = controller.rfc3339(now)
        if self._source is None:
            wanted = disabled_status(generation, previous, stamp)
            written = await self._write_status(body, wanted, previous, logger)
            return Tick(
                status_written=written,
                done=written or not reporting.changed(wanted, previous, whole=_OWN_MAPS),
            )
        try:
            pool = validation.parse_pool(body)
        except validation.InvalidPoolError:
            return Tick()  # the operator reports it; nothing to scale
        interval = api.parse_duration(pool.spec.autoscaling.interval)
        spec = planner.PlannerSpec.from_api(pool.spec, **self._tunables)
        roles = pool.roles()
        found = await asyncio.gather(
            *(
                self._kube.find(kinds.DEPLOYMENTS, namespace, planning.name_of(pool, r))
                for r in roles
            )
        )
        deployments: dict[planner.Role, K8sObject] = {}
        for role, dep in zip(roles, found, strict=True):
            if dep is None or applying.controller_uid(dep) != pool.metadata.uid:
                logger.debug("Autoscaler: no %s Deployment of this pool yet", role)
                return Tick(interval)
            deployments[role] = dep
        a = pool.spec.autoscaling
        readings = await self._source.read_pool(
            spec,
            pool.name,
            roles,
            window=api.parse_duration(a.window),
            warmup=api.parse_duration(a.warmup),
            namespace=namespace,
        )

        def inputs(role: planner.Role) -> planner.RoleInputs:
            dep = deployments[role]
            replicas = int((dep.get("spec") or {}).get("replicas", 1))
            ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
            return readings[role].inputs(replicas, ready)

        key = (namespace, name)
        state = self._states.get(key) or restore(previous)
        plan = planner.decide(
            spec,
            planner.Inputs(
                decode=inputs("decode"),
                prefill=inputs("prefill") if "prefill" in deployments else None,
            ),
            state,
            now.timestamp(),
        )
        result = Tick(interval, plan)
        kept = plan.state
        for d in plan.decisions:
            if d.changed and d.replicas is not None:
                try:
                    await self._kube.apply(
                        _scale_object(deployments[d.role], d.replicas),
                        field_manager=FIELD_MANAGER,
                        force=True,
                    )
                except client.ApiError as exc:
                    message = f"Cannot scale {d.role} to {d.replicas}: {exc}"
                    logger.error("%s", message)
                    result.notices.append(controller.Notice("Warning", "ScaleFailed", message))
                    # It did not happen: no cooldown, and the decision is not recorded.
                    held = dataclasses.replace(d, replicas=d.current, action="hold")
                    if d.role == "prefill":
                        kept = dataclasses.replace(kept, prefill=state.prefill)
                        plan = dataclasses.replace(plan, prefill=held)
                    else:
                        kept = dataclasses.replace(kept, decode=state.decode)
                        plan = dataclasses.replace(plan, decode=held)
                    continue
                logger.info("%s", d.reason)
            else:
                logger.debug("%s", d.reason)
        self._states[key] = kept
        result.plan = plan
        wanted = status(plan, readings, generation, previous, stamp, pool.spec.slo)
        result.notices += notices(plan, wanted, previous)
        for notice in result.notices:
            if notice.type == "Warning" and notice.reason != "ScaleFailed":
                logger.warning("%s", notice.message)
        result.status_written = await self._write_status(body, wanted, previous, logger)
        return result

    async def _write_status(
        self,
        body: Mapping[str, Any],
        wanted: Mapping[str, Any],
        previous: Mapping[str, Any],
        logger: controller.Logger,
    ) -> bool:
        if not reporting.changed(wanted, previous, whole=_OWN_MAPS):
            return False
        try:
            await self._kube.apply(
                reconcile.status_object(body, wanted),
                field_manager=FIELD_MANAGER,
                force=True,
                subresource="status",
            )
        except client.ApiError as exc:
            logger.warning("Autoscaler: cannot write the status: %s", exc)
            return False
        return True

    async def run(
        self,
        body: Mapping[str, Any],
        stopped: Stopped,
        post: Callable[[Sequence[controller.Notice]], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """The daemon of one pool: tick, post, sleep the pool's interval; until stopped.

        ``body`` is kopf's live view of the pool (updated in place as it changes);
        ``stopped`` is kopf's daemon flag (truthy once stopping, ``wait(timeout)``).
        """
        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        logger = controller.PoolLogger(namespace, name)
        try:
            while not stopped:
                started = monotonic()
                try:
                    result = await self.tick(body)
                except client.ApiError as exc:
                    logger.warning("Autoscaler: %s", exc)
                    result = Tick()
                if result.notices:
                    post(result.notices)
                if result.done:
                    return
                await stopped.wait(max(0.0, result.interval - (monotonic() - started)))
        finally:
            self.forget(namespace, name)

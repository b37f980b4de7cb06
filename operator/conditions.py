"""The pool's status, from what was observed of its children. Pure.

The operator owns the conditions ``Ready``, ``Progressing`` and ``Degraded``,
``observedGeneration``, the per-role ``replicas``/``readyReplicas``/
``desiredReplicas``/``summary`` and ``endpoint``; it writes them by server-side
apply, so what the autoscaler writes beside them (its own conditions, the last
decisions, observed latencies) is left alone.

- **Ready**: the pool can serve: the router and the decode pool (and, in
  ``disaggregated`` mode, the prefill pool) each have a ready replica, unless
  scaled to zero on purpose.
- **Progressing**: a Deployment is being created, rolled out or scaled, or has
  replicas that are not ready yet.
- **Degraded**: something needs a human: a child the operator may not take over,
  an apply the API server refused, a rollout past its deadline, a ReplicaSet that
  cannot create pods, or a spec the operator cannot read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

OPERATOR_CONDITIONS = ("Ready", "Progressing", "Degraded")
Component = Literal["prefill", "decode", "router"]


@dataclass(frozen=True)
class Problem:
    """Something that went wrong while reconciling, for Degraded."""

    reason: str
    """CamelCase, e.g. ``ChildConflict``, ``ApplyFailed``, ``InvalidSpec``."""
    message: str


@dataclass(frozen=True)
class Workload:
    """What one Deployment of the pool looks like right now."""

    exists: bool = False
    desired: int = 0
    """``spec.replicas``: what the autoscaler (or the plan, for the router) wants."""
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    generation: int = 0
    observed_generation: int = 0
    failure: Problem | None = None
    """Why the Deployment cannot make progress, when it says so."""

    @classmethod
    def of(cls, deployment: Mapping[str, Any] | None) -> Workload:
        if deployment is None:
            return cls()
        spec = deployment.get("spec") or {}
        status = deployment.get("status") or {}
        failure = None
        for cond in status.get("conditions") or []:
            reason: str | None = None
            if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
                reason = "ReplicaFailure"
            elif cond.get("type") == "Progressing" and cond.get("reason") == (
                "ProgressDeadlineExceeded"
            ):
                reason = "ProgressDeadlineExceeded"
            if reason is not None:
                failure = Problem(reason, f"{reason}: {cond.get('message', '')}".strip())
        return cls(
            exists=True,
            desired=int(spec.get("replicas", 1)),
            replicas=int(status.get("replicas", 0)),
            ready=int(status.get("readyReplicas", 0)),
            updated=int(status.get("updatedReplicas", 0)),
            generation=int((deployment.get("metadata") or {}).get("generation", 0)),
            observed_generation=int(status.get("observedGeneration", 0)),
            failure=failure,
        )

    @property
    def serving(self) -> bool:
        """At least one ready replica, or none wanted."""
        return self.exists and (self.ready >= 1 or self.desired == 0)

    @property
    def settled(self) -> bool:
        return (
            self.exists
            and self.observed_generation >= self.generation
            and self.updated >= self.desired
            and self.replicas == self.desired
            and self.ready >= self.desired
        )

    def summary(self) -> str:
        return f"{self.ready}/{self.desired}"


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from."""

    generation: int
    mode: str
    workloads: Mapping[Component, Workload]
    """The router and each worker role the pool runs (no prefill in aggregated mode)."""
    endpoint: str
    problems: Sequence[Problem] = field(default_factory=tuple)


def _condition(
    type_: str, status: bool, reason: str, message: str, generation: int
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def _ready(obs: Observation) -> dict[str, Any]:
    needed: list[Component] = ["decode", "router"]
    if obs.mode == "disaggregated":
        needed.insert(0, "prefill")
    waiting = [c for c in needed if not obs.workloads.get(c, Workload()).serving]
    counts = ", ".join(f"{c} {w.summary()}" for c, w in obs.workloads.items())
    if not waiting:
        return _condition("Ready", True, "Serving", f"ready: {counts}", obs.generation)
    first = waiting[0]
    return _condition(
        "Ready",
        False,
        f"{first.capitalize()}NotReady",
        f"no ready replica yet in: {', '.join(waiting)} ({counts})",
        obs.generation,
    )


def _progressing(obs: Observation) -> dict[str, Any]:
    for component, w in obs.workloads.items():
        if not w.exists:
            return _condition(
                "Progressing", True, "Creating", f"{component} is being created", obs.generation
            )
    for component, w in obs.workloads.items():
        if w.observed_generation < w.generation or w.updated < w.desired:
            return _condition(
                "Progressing",
                True,
                "RollingOut",
                f"{component}: {w.updated}/{w.desired} replicas updated",
                obs.generation,
            )
    for component, w in obs.workloads.items():
        if w.replicas != w.desired:
            reason = "ScalingUp" if w.replicas < w.desired else "ScalingDown"
            return _condition(
                "Progressing",
                True,
                reason,
                f"{component}: {w.replicas}→{w.desired} replicas",
                obs.generation,
            )
    for component, w in obs.workloads.items():
        if w.ready < w.desired:
            return _condition(
                "Progressing",
                True,
                "WaitingForReady",
                f"{component}: {w.ready}/{w.desired} replicas ready",
                obs.generation,
            )
    return _condition(
        "Progressing", False, "Complete", "every Deployment is at its desired state", obs.generation
    )


def _degraded(obs: Observation) -> dict[str, Any]:
    if obs.problems:
        first = obs.problems[0]
        message = "; ".join(p.message for p in obs.problems)
        return _condition("Degraded", True, first.reason, message, obs.generation)
    for component, w in obs.workloads.items():
        if w.failure:
            reason = w.failure.split(":", 1)[0]
            return _condition("Degraded", True, reason, f"{component}: {w.failure}", obs.generation)
    return _condition("Degraded", False, "AsExpected", "", obs.generation)


def conditions(
    obs: Observation, previous: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded; ``lastTransitionTime`` moves only when status does."""
    before = {c.get("type"): c for c in previous}
    out = []
    for cond in (_ready(obs), _progressing(obs), _degraded(obs)):
        old = before.get(cond["type"])
        if (
            old is not None
            and old.get("status") == cond["status"]
            and old.get("lastTransitionTime")
        ):
            cond["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            cond["lastTransitionTime"] = now
        out.append(cond)
    return out


def _role(workload: Workload | None) -> dict[str, Any]:
    if workload is None:  # the pool does not run this role (aggregated mode)
        return {"replicas": 0, "readyReplicas": 0, "desiredReplicas": 0, "summary": "-"}
    return {
        "replicas": workload.replicas,
        "readyReplicas": workload.ready,
        "desiredReplicas": workload.desired,
        "summary": workload.summary(),
    }


def status(obs: Observation, previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The fields of ``status`` the operator owns."""
    return {
        "observedGeneration": obs.generation,
        "conditions": conditions(obs, previous.get("conditions") or [], now),
        "prefill": _role(obs.workloads.get("prefill")),
        "decode": _role(obs.workloads.get("decode")),
        "endpoint": obs.endpoint,
    }


def invalid_status(
    generation: int, message: str, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """Status for a spec the operator cannot read (the children are left as they are)."""
    conds = [
        _condition("Ready", False, "InvalidSpec", message, generation),
        _condition("Progressing", False, "InvalidSpec", message, generation),
        _condition("Degraded", True, "InvalidSpec", message, generation),
    ]
    before = {c.get("type"): c for c in previous.get("conditions") or []}
    for cond in conds:
        old = before.get(cond["type"])
        same = old is not None and old.get("status") == cond["status"]
        cond["lastTransitionTime"] = (
            old.get("lastTransitionTime") if same and old else None
        ) or now
    return {"observedGeneration": generation, "conditions": conds}


def changed(wanted: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether writing ``wanted`` would change ``current`` (other writers' fields aside)."""
    for name, value in wanted.items():
        if name == "conditions":
            have = {c.get("type"): c for c in current.get("conditions") or []}
            for cond in value:
                old = have.get(cond["type"])
                if old is None or any(old.get(k) != v for k, v in cond.items()):
                    return True
        elif isinstance(value, Mapping):
            old_map = current.get(name)
            if not isinstance(old_map, Mapping) or any(
                old_map.get(k) != v for k, v in value.items()
            ):
                return True
        elif current.get(name) != value:
            return True
    return False

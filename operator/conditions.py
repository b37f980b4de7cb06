"""The pool's status, from what was observed of its children. Pure.

The operator owns the conditions ``Ready``, ``Progressing`` and ``Degraded``,
``observedGeneration``, the per-role ``replicas``/``readyReplicas``/
``desiredReplicas``/``summary`` and ``endpoint``; it writes them by server-side
apply, so what the autoscaler writes beside them (its own conditions, the last
decisions, observed latencies) is left alone. Conditions, the body and the
change check come from :mod:`.reporting`, which the autoscaler uses too.

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

from . import api, reporting

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


Verdict = tuple[bool, str, str]
"""A condition's status (True or False), its CamelCase reason and its message."""

_NOT_READY: Mapping[Component, str] = {
    "prefill": "PrefillNotReady",
    "decode": "DecodeNotReady",
    "router": "RouterNotReady",
}


def _ready(obs: Observation) -> Verdict:
    needed: list[Component] = ["decode", "router"]
    if obs.mode == "disaggregated":
        needed.insert(0, "prefill")
    waiting = [c for c in needed if not obs.workloads.get(c, Workload()).serving]
    counts = ", ".join(f"{c} {w.summary()}" for c, w in obs.workloads.items())
    if not waiting:
        return True, "Serving", f"ready: {counts}"
    return (
        False,
        _NOT_READY[waiting[0]],
        f"no ready replica yet in: {', '.join(waiting)} ({counts})",
    )


def _progressing(obs: Observation) -> Verdict:
    for component, w in obs.workloads.items():
        if not w.exists:
            return True, "Creating", f"{component} is being created"
    for component, w in obs.workloads.items():
        if w.observed_generation < w.generation or w.updated < w.desired:
            return True, "RollingOut", f"{component}: {w.updated}/{w.desired} replicas updated"
    for component, w in obs.workloads.items():
        if w.replicas != w.desired:
            reason = "ScalingUp" if w.replicas < w.desired else "ScalingDown"
            return True, reason, f"{component}: {w.replicas}→{w.desired} replicas"
    for component, w in obs.workloads.items():
        if w.ready < w.desired:
            return True, "WaitingForReady", f"{component}: {w.ready}/{w.desired} replicas ready"
    return False, "Complete", "every Deployment is at its desired state"


def _degraded(obs: Observation) -> Verdict:
    if obs.problems:
        message = "; ".join(p.message for p in obs.problems)
        return True, obs.problems[0].reason, message
    for component, w in obs.workloads.items():
        if w.failure is not None:
            return True, w.failure.reason, f"{component}: {w.failure.message}"
    return False, "AsExpected", ""


def _conditions(
    verdicts: Mapping[api.ConditionType, Verdict],
    generation: int,
    previous: Mapping[str, Any],
    now: str,
) -> list[api.Condition]:
    before = previous.get("conditions") or []
    return [
        reporting.condition(
            type_, ok, reason, message, generation=generation, previous=before, now=now
        )
        for type_, (ok, reason, message) in verdicts.items()
    ]


def conditions(
    obs: Observation, previous: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded; ``lastTransitionTime`` moves only when status does."""
    conds: list[dict[str, Any]] = status(obs, {"conditions": previous}, now)["conditions"]
    return conds


def _role(workload: Workload | None) -> api.RoleStatus:
    if workload is None:  # the pool does not run this role (aggregated mode)
        return api.RoleStatus(replicas=0, ready_replicas=0, desired_replicas=0, summary="-")
    return api.RoleStatus(
        replicas=workload.replicas,
        ready_replicas=workload.ready,
        desired_replicas=workload.desired,
        summary=workload.summary(),
    )


def status(obs: Observation, previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The fields of ``status`` the operator owns."""
    verdicts: dict[api.ConditionType, Verdict] = {
        "Ready": _ready(obs),
        "Progressing": _progressing(obs),
        "Degraded": _degraded(obs),
    }
    return reporting.dump(
        api.InferencePoolStatus(
            observed_generation=obs.generation,
            conditions=_conditions(verdicts, obs.generation, previous, now),
            prefill=_role(obs.workloads.get("prefill")),
            decode=_role(obs.workloads.get("decode")),
            endpoint=obs.endpoint,
        )
    )


def invalid_status(
    generation: int, message: str, previous: Mapping[str, Any], now: str
) -> dict[str, Any]:
    """Status for a spec the operator cannot read (the children are left as they are)."""
    verdicts: dict[api.ConditionType, Verdict] = {
        "Ready": (False, "InvalidSpec", message),
        "Progressing": (False, "InvalidSpec", message),
        "Degraded": (True, "InvalidSpec", message),
    }
    return reporting.dump(
        api.InferencePoolStatus(
            observed_generation=generation,
            conditions=_conditions(verdicts, generation, previous, now),
        )
    )

"""What to do about one pool, given its plan and what exists. Pure.

:func:`decide` compares the planned children (:func:`tandem.operator.planning.plan`)
with the live ones and returns the writes to make; :mod:`.controller` makes them.
:func:`child_trigger` decides, from one watch event of a child, whether its pool
needs a reconcile at all, so that the steady stream of Deployment status updates
costs no API calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import api, applying, conditions, kinds, planning

K8sObject = dict[str, Any]
Key = tuple[str, str]


@dataclass(frozen=True)
class Apply:
    obj: K8sObject
    """The prepared object (see :func:`tandem.operator.applying.prepare`)."""
    why: str
    """``missing``, ``outdated`` (the plan changed), ``drifted`` (changed by hand), or
    ``release-replicas`` (the operator lets go of a worker's ``spec.replicas``)."""

    @property
    def key(self) -> Key:
        return applying.key(self.obj)


@dataclass(frozen=True)
class Prune:
    resource: kinds.Resource
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class Decision:
    handovers: tuple[K8sObject, ...] = ()
    """Replicas-only objects the autoscaler's field manager applies first."""
    applies: tuple[Apply, ...] = ()
    prunes: tuple[Prune, ...] = ()
    conflicts: tuple[conditions.Problem, ...] = ()

    @property
    def idle(self) -> bool:
        return not (self.handovers or self.applies or self.prunes)


def _is_terminating(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def decide(
    pool: api.InferencePool, desired: Sequence[K8sObject], live: Mapping[Key, K8sObject]
) -> Decision:
    """The writes that bring the live children to the plan.

    ``live``: the pool's labelled children, plus whatever holds the name of a
    planned child that was not among them (looked up by name).
    """
    uid = pool.metadata.uid
    handovers: list[K8sObject] = []
    applies: list[Apply] = []
    conflicts: list[conditions.Problem] = []
    wanted: set[Key] = set()
    for obj in desired:
        k = applying.key(obj)
        wanted.add(k)
        current = live.get(k)
        if current is not None and applying.controller_uid(current) != uid:
            state = "is being deleted" if _is_terminating(current) else "is not owned by this pool"
            conflicts.append(
                conditions.Problem(
                    "ChildConflict", f"{k[0]} {pool.namespace}/{k[1]} exists and {state}"
                )
            )
            continue
        prepared = applying.prepare(obj, current)
        why = applying.drift(prepared, current)
        if current is not None and applying.is_worker_deployment(current):
            if applying.needs_replicas_handover(current):
                handovers.append(applying.replicas_handover(current))
            if why is None and applying.operator_owns_replicas(current):
                why = "release-replicas"
        if why is not None:
            applies.append(Apply(prepared, why))
    prunes = [
        Prune(kinds.of(obj), pool.namespace, k[1], str(obj["metadata"]["uid"]))
        for k, obj in sorted(live.items())
        if k not in wanted and applying.controller_uid(obj) == uid and not _is_terminating(obj)
    ]
    return Decision(tuple(handovers), tuple(applies), tuple(prunes), tuple(conflicts))


def after_create(desired: Mapping[str, Any], created: Mapping[str, Any]) -> Decision:
    """Right after a worker Deployment was created: hand its replicas to the autoscaler."""
    if not applying.needs_replicas_handover(created):
        return Decision()
    return Decision(
        handovers=(applying.replicas_handover(created),),
        applies=(Apply(applying.prepare(desired, created), "release-replicas"),),
    )


# ---------------------------------------------------------------------------
# Status


def observation(
    pool: api.InferencePool,
    children: Mapping[Key, K8sObject],
    problems: Sequence[conditions.Problem] = (),
) -> conditions.Observation:
    """What the status is computed from: the pool's Deployments as they are now."""
    workloads: dict[conditions.Component, conditions.Workload] = {}
    for role in pool.roles():
        workloads[role] = conditions.Workload.of(
            children.get(("Deployment", planning.name_of(pool, role)))
        )
    workloads["router"] = conditions.Workload.of(
        children.get(("Deployment", planning.name_of(pool, "router")))
    )
    return conditions.Observation(
        generation=pool.metadata.generation or 0,
        mode=pool.spec.mode,
        workloads=workloads,
        endpoint=planning.endpoint(pool),
        problems=tuple(problems),
    )


def status_object(pool_body: Mapping[str, Any], status: Mapping[str, Any]) -> K8sObject:
    """What is applied to the status subresource."""
    meta = pool_body["metadata"]
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default")},
        "status": dict(status),
    }


# ---------------------------------------------------------------------------
# Child watch events


@dataclass(frozen=True)
class ChildEvent:
    type: str | None
    """``ADDED``, ``MODIFIED``, ``DELETED``, or None for the initial listing."""
    body: Mapping[str, Any] = field(default_factory=dict)


def owner_pool(child: Mapping[str, Any]) -> str | None:
    """The name of the pool that controls a child, if one does."""
    for ref in (child.get("metadata") or {}).get("ownerReferences") or []:
        if (
            ref.get("controller")
            and ref.get("kind") == api.KIND
            and ref.get("apiVersion", "").startswith(f"{api.GROUP}/")
        ):
            return str(ref.get("name"))
    return None


def child_trigger(
    pool: api.InferencePool, event: ChildEvent, settings: planning.PlanSettings
) -> str | None:
    """Why a child's watch event calls for a reconcile of its pool; None if it does not."""
    child = event.body
    if applying.controller_uid(child) != pool.metadata.uid:
        return None
    k = applying.key(child)
    if event.type == "DELETED":
        return f"{k[0]} {k[1]} was deleted"
    if _is_terminating(child):
        return None
    desired = {applying.key(o): o for o in planning.plan(pool, settings)}
    if k not in desired:
        return f"{k[0]} {k[1]} is no longer planned"
    why = applying.drift(applying.prepare(desired[k], child), child)
    if why is not None:
        return f"{k[0]} {k[1]} is {why}"
    if k[0] == "Deployment":
        role = (child["metadata"].get("labels") or {}).get(planning.LABEL_ROLE) or "router"
        if role in ("prefill", "decode"):
            current = getattr(pool.status, role) if pool.status else None
            w = conditions.Workload.of(child)
            if current is None or (current.replicas, current.ready_replicas,
                                   current.desired_replicas) != (w.replicas, w.ready, w.desired):  # fmt: skip
                return f"{k[0]} {k[1]} status changed"
        elif pool.status is not None:
            # The router's readiness only shows in the conditions: compare Ready.
            ready = next((c for c in pool.status.conditions if c.type == "Ready"), None)
            if ready is None or (ready.status == "True") != conditions.Workload.of(child).serving:
                return f"{k[0]} {k[1]} status changed"
    return None

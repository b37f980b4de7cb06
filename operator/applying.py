"""How a planned object becomes what the operator applies, and when it must.

Pure. The reconciler applies every child with server-side apply under the field
manager ``tandem-operator``. Three rules live here:

- **Replicas belong to the autoscaler.** A worker Deployment's ``spec.replicas``
  is sent only when the Deployment is created. Merely leaving it out later is not
  enough: a field that a manager stops applying is *removed* when no other
  manager owns it, and the Deployment would fall back to 1 replica. So once a
  worker Deployment exists, its ``spec.replicas`` is handed over to the field
  manager ``tandem-autoscaler`` (same value, nothing changes) before the operator
  releases it; from then on only the autoscaler, or HPA/KEDA, writes it.
- **Apply only on a difference.** Each applied object carries the hash of what
  was applied (:data:`ANNOTATION_APPLIED_HASH`). An object needs applying when it
  is missing, when the plan changed (the hash differs: this also catches fields
  the plan no longer sets), or when someone changed a field the operator sets
  (the planned fields are not a subset of the live object). Applying the same
  spec twice therefore sends nothing at all.
- **Never adopt a stranger.** A live object that is not controlled by the pool
  (no controller ownerReference with its uid) is left alone and reported.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from . import planning

FIELD_MANAGER = "tandem-operator"
AUTOSCALER_FIELD_MANAGER = "tandem-autoscaler"
ANNOTATION_APPLIED_HASH = "tandem.dev/applied-hash"

K8sObject = dict[str, Any]


def key(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``(kind, name)``: unique among one pool's children (they share a namespace)."""
    return str(obj["kind"]), str(obj["metadata"]["name"])


def is_worker_deployment(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return obj.get("kind") == "Deployment" and planning.LABEL_ROLE in labels


def digest(desired: Mapping[str, Any]) -> str:
    """A short hash of a planned object, ignoring what the operator does not keep applying."""
    body = copy.deepcopy(dict(desired))
    if is_worker_deployment(body):
        body.get("spec", {}).pop("replicas", None)
    body.get("metadata", {}).get("annotations", {}).pop(ANNOTATION_APPLIED_HASH, None)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> K8sObject:
    """The object to apply: the hash annotation added, and worker replicas dropped
    once the Deployment exists."""
    out = copy.deepcopy(dict(desired))
    meta = out.setdefault("metadata", {})
    meta.setdefault("annotations", {})[ANNOTATION_APPLIED_HASH] = digest(desired)
    if live is not None and is_worker_deployment(out):
        out.get("spec", {}).pop("replicas", None)
    return out


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    # Quantities and int-or-string fields come back as strings ("1" for 1).
    if isinstance(want, int | float) and isinstance(have, str) and not isinstance(want, bool):
        return str(want) == have
    return False


def is_subset(want: Any, have: Any) -> bool:
    """Whether every field of ``want`` is in ``have`` with the same value.

    Lists must have the same length; their items compare the same way (the API
    server adds defaults inside items, e.g. ``imagePullPolicy`` in containers).
    """
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            k in have and is_subset(v, have[k]) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(is_subset(w, h) for w, h in zip(want, have, strict=True))
        )
    return _same_scalar(want, have)


def drift(prepared: Mapping[str, Any], live: Mapping[str, Any] | None) -> str | None:
    """Why ``prepared`` must be applied over ``live``; None when it need not be."""
    if live is None:
        return "missing"
    applied = ((live.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED_HASH)
    if applied != prepared["metadata"]["annotations"][ANNOTATION_APPLIED_HASH]:
        return "outdated"
    if not is_subset(prepared, live):
        return "drifted"
    return None


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller (its controlling ownerReference), if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


def owns_replicas(entry: Mapping[str, Any]) -> bool:
    """Whether one managedFields entry owns ``spec.replicas``."""
    fields = entry.get("fieldsV1") or {}
    return "f:replicas" in (fields.get("f:spec") or {})


def needs_replicas_handover(live: Mapping[str, Any]) -> bool:
    """Whether the operator still owns a worker Deployment's ``spec.replicas`` alone.

    Then leaving the field out of the next apply would delete it (back to 1 replica):
    it must first be claimed by :data:`AUTOSCALER_FIELD_MANAGER`.
    """
    if not is_worker_deployment(live):
        return False
    owners = [
        (e.get("manager"), e.get("operation"))
        for e in (live.get("metadata") or {}).get("managedFields") or []
        if owns_replicas(e)
    ]
    return (FIELD_MANAGER, "Apply") in owners and len(owners) == 1


def operator_owns_replicas(live: Mapping[str, Any]) -> bool:
    """Whether the operator's apply still claims ``spec.replicas`` (with others or alone)."""
    return any(
        e.get("manager") == FIELD_MANAGER and e.get("operation") == "Apply" and owns_replicas(e)
        for e in (live.get("metadata") or {}).get("managedFields") or []
    )


def replicas_handover(live: Mapping[str, Any]) -> K8sObject:
    """What :data:`AUTOSCALER_FIELD_MANAGER` applies to claim ``spec.replicas`` as it is."""
    meta = live["metadata"]
    return {
        "apiVersion": live["apiVersion"],
        "kind": live["kind"],
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": {"replicas": (live.get("spec") or {}).get("replicas", 1)},
    }

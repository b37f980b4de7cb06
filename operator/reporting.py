"""What the two writers of a pool's status share. Pure.

The operator (:mod:`.conditions`) and the autoscaler (:mod:`.autoscaler`) each apply
their own part of ``status`` under their own field manager. Both build it as
:class:`~.api.InferencePoolStatus`, with conditions made by :func:`condition` (whose
``lastTransitionTime`` moves only when the status does), dump it with :func:`dump`,
and skip the write when :func:`changed` says it would change nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from . import api

__all__ = ["changed", "condition", "dump"]


def condition(
    type_: api.ConditionType,
    ok: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> api.Condition:
    """A condition; ``lastTransitionTime`` is the previous one's while the status holds,
    else ``now``. ``previous`` are the conditions as stored (any writer's)."""
    status: api.ConditionStatus = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = (
        old.get("lastTransitionTime") if old is not None and old.get("status") == status else None
    )
    return api.Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=since or now,
    )


def dump(status: api.InferencePoolStatus) -> dict[str, Any]:
    """The body to apply: only the fields the writer set, so that a field another
    manager owns is never claimed (the models' defaults stay out)."""
    return status.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)


def changed(
    wanted: Mapping[str, Any], current: Mapping[str, Any], *, whole: Collection[str] = ()
) -> bool:
    """Whether applying ``wanted`` would change ``current``.

    Conditions are compared by type and maps key by key, so what other writers keep
    beside them does not count; but a map named in ``whole`` is the writer's alone,
    and a key it no longer sends (which the API server would remove) is a change.
    """
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
            if name in whole and set(old_map) - set(value):
                return True
        elif current.get(name) != value:
            return True
    return False

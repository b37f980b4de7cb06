"""The words every part of Tandem shares: a worker's role and a pool's mode.

Defined once here (the API, the planner, the router, the launcher and local mode
all say the same thing); this module imports nothing.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["ROLES", "Mode", "Role", "WorkerKind"]

Role = Literal["prefill", "decode"]
"""A disaggregated worker's job: prefill the prompt, or decode its tokens."""

WorkerKind = Literal["prefill", "decode", "aggregated"]
"""What a worker process does: one role, or both on one engine (``aggregated``)."""

Mode = Literal["disaggregated", "aggregated", "auto"]
"""How a pool serves: always two hops, always one worker, or the router decides."""

ROLES: tuple[Role, ...] = get_args(Role)

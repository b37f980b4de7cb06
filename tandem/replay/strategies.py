"""Scaling strategies the replay compares, behind one small protocol.

A :class:`Strategy` is a frozen description (sizes at time 0, where requests
arrive, GPUs per worker); each run gets a fresh :class:`Controller` from it, which
holds whatever memory the strategy has and acts on the simulated pools through
:class:`Pools` only: ``start`` at time 0, ``tick`` every ``interval``. The
simulator never asks which strategy it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tandem import roles
from tandem.autoscaling import planner
from tandem.replay import settings

__all__ = [
    "Colocated",
    "Controller",
    "Hpa",
    "Pools",
    "Scheduled",
    "Static",
    "Strategy",
    "Tandem",
]


class Pools(Protocol):
    """What a strategy sees of the simulated pools, and how it changes them."""

    @property
    def now(self) -> float: ...

    @property
    def config(self) -> settings.ReplayConfig: ...

    def size(self, role: roles.Role) -> int:
        """Workers of ``role`` asked for and not being removed."""
        ...

    def role_inputs(self, role: roles.Role) -> planner.RoleInputs:
        """The planner's inputs, as the operator would read them now."""
        ...

    def busy_fractions(self, role: roles.Role) -> list[float]:
        """Per ready worker, the share of the last ``window`` it ran a step (GPU util)."""
        ...

    def apply(self, role: roles.Role, target: int, reason: str) -> None:
        """Grow or shrink ``role`` to ``target`` workers (a decision, recorded)."""
        ...

    def at(self, t: float, action: Callable[[], None]) -> None:
        """Run ``action`` at virtual time ``t``."""
        ...


class Controller(Protocol):
    """One run's autoscaler."""

    def start(self, pools: Pools) -> None: ...

    def tick(self, pools: Pools) -> None: ...


class Strategy(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def arrivals(self) -> roles.WorkerKind:
        """Where a request goes first: ``prefill``, or ``aggregated`` workers."""
        ...

    def sizes(self) -> dict[roles.WorkerKind, int]:
        """Workers at time 0 (warm)."""
        ...

    def gpus_per_worker(self, kind: roles.WorkerKind) -> int: ...

    def controller(self) -> Controller: ...


class _Fixed:
    """Never changes a pool."""

    def start(self, pools: Pools) -> None:
        pass

    def tick(self, pools: Pools) -> None:
        pass


@dataclass(frozen=True)
class _TwoPools:
    """Disaggregated pools of one GPU per worker, ``prefill`` + ``decode`` at time 0."""

    prefill: int
    decode: int

    def sizes(self) -> dict[roles.WorkerKind, int]:
        return {"prefill": self.prefill, "decode": self.decode}

    def gpus_per_worker(self, kind: roles.WorkerKind) -> int:
        return 1


@dataclass(frozen=True)
class Static(_TwoPools):
    """Fixed disaggregated pools."""

    name: str = "static"
    arrivals: roles.WorkerKind = "prefill"

    def controller(self) -> Controller:
        return _Fixed()


@dataclass(frozen=True)
class Colocated:
    """Fixed aggregated workers: each prefills and decodes."""

    workers: int
    name: str = "colocated"
    arrivals: roles.WorkerKind = "aggregated"

    def sizes(self) -> dict[roles.WorkerKind, int]:
        return {"aggregated": self.workers}

    def gpus_per_worker(self, kind: roles.WorkerKind) -> int:
        return 1

    def controller(self) -> Controller:
        return _Fixed()


@dataclass(frozen=True)
class Hpa(_TwoPools):
    """A utilization-style autoscaler, as a Kubernetes HPA on a GPU-utilization
    metric (DCGM's ``GPU_UTIL``: the fraction of time a kernel runs) would do:
    ``desired = ceil(sum(util) / target)`` over ready pods, 10% tolerance,
    scale-up at once, scale-down to the highest recommendation of 5 minutes."""

    bounds: tuple[planner.RoleBounds, planner.RoleBounds]
    """(prefill, decode) replica bounds."""
    target: float = 0.7
    tolerance: float = 0.1
    scale_down_stabilization: float = 300.0
    name: str = "hpa"
    arrivals: roles.WorkerKind = "prefill"

    def controller(self) -> Controller:
        return _HpaController(self)


@dataclass
class _HpaController:
    hpa: Hpa
    history: dict[roles.Role, list[tuple[float, int]]] = field(
        default_factory=lambda: {"prefill": [], "decode": []}
    )

    def start(self, pools: Pools) -> None:
        pass

    def tick(self, pools: Pools) -> None:
        self._role(pools, "prefill", self.hpa.bounds[0])
        self._role(pools, "decode", self.hpa.bounds[1])

    def _role(self, pools: Pools, role: roles.Role, bounds: planner.RoleBounds) -> None:
        s, now = self.hpa, pools.now
        current = pools.size(role)
        utils = pools.busy_fractions(role)
        if not utils:
            return
        mean = sum(utils) / len(utils)
        ratio = mean / s.target
        desired = current if abs(ratio - 1) <= s.tolerance else math.ceil(sum(utils) / s.target)
        desired = bounds.clamp(max(desired, 1))
        window = s.scale_down_stabilization
        history = [(t, n) for t, n in self.history[role] if t > now - window]
        history.append((now, desired))
        self.history[role] = history
        if desired > current:  # the HPA's default policy: at most double, or +4
            target = min(desired, max(2 * current, current + 4))
        else:
            target = min(current, max(n for _, n in history))
        pools.apply(
            role, target, f"{role} {current}→{target}: GPU util {mean:.0%} (target {s.target:.0%})"
        )


@dataclass(frozen=True)
class Tandem:
    """The planner of :mod:`tandem.autoscaling.planner`, fed from the simulated metrics."""

    prefill: int
    decode: int
    spec: planner.PlannerSpec
    name: str = "tandem"
    arrivals: roles.WorkerKind = "prefill"

    def sizes(self) -> dict[roles.WorkerKind, int]:
        return {"prefill": self.prefill, "decode": self.decode}

    def gpus_per_worker(self, kind: roles.WorkerKind) -> int:
        role: roles.Role = "prefill" if kind == "prefill" else "decode"
        return self.spec.bounds(role).tensor_parallel_size

    def controller(self) -> Controller:
        return _TandemController(self.spec)


@dataclass
class _TandemController:
    spec: planner.PlannerSpec
    state: planner.PlannerState = field(default_factory=planner.PlannerState)

    def start(self, pools: Pools) -> None:
        pass

    def tick(self, pools: Pools) -> None:
        inputs = planner.Inputs(
            decode=pools.role_inputs("decode"), prefill=pools.role_inputs("prefill")
        )
        plan = planner.decide(self.spec, inputs, self.state, pools.now)
        self.state = plan.state
        for d in plan.decisions:
            if d.replicas is not None:
                pools.apply(d.role, d.replicas, d.reason)


@dataclass(frozen=True)
class Scheduled(_TwoPools):
    """Pools that follow a schedule known in advance: each change names the sizes
    that serve from its time on. Workers for a growth are asked for one
    provisioning delay early; a shrink drains at its time. With a schedule read
    off the trace in hindsight, the ceiling any autoscaler could reach."""

    changes: tuple[tuple[float, int, int], ...]
    """``(time, prefill, decode)``, in time order."""
    name: str = "scheduled"
    arrivals: roles.WorkerKind = "prefill"

    @property
    def start(self) -> tuple[int, int]:
        """``(prefill, decode)`` at time 0."""
        return self.prefill, self.decode

    def controller(self) -> Controller:
        return _ScheduleController(self)


@dataclass
class _ScheduleController:
    schedule: Scheduled

    def start(self, pools: Pools) -> None:
        """Ask for each change's growth a provisioning delay ahead, shrink on time."""
        s = self.schedule
        sizes: dict[roles.Role, int] = {"prefill": s.prefill, "decode": s.decode}
        for t, prefill, decode in s.changes:
            moves: tuple[tuple[roles.Role, int], ...] = (("prefill", prefill), ("decode", decode))
            for role, size in moves:
                if size == sizes[role]:
                    continue
                ahead = pools.config.provisioning_delay if size > sizes[role] else 0.0
                when = max(0.0, t - ahead)
                pools.at(when, _applying(pools, role, size, f"scheduled for {t:g}s"))
                sizes[role] = size

    def tick(self, pools: Pools) -> None:
        pass


def _applying(pools: Pools, role: roles.Role, size: int, reason: str) -> Callable[[], None]:
    return lambda: pools.apply(role, size, reason)

"""What a replay measured: every request's outcome, the GPU-seconds, the timelines and
the scaling decisions, with the attainment and flapping scores the benchmark reports."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from tandem import roles
from tandem.replay import workloads

__all__ = ["Decision", "RequestOutcome", "Result", "TimelinePoint", "oscillations"]


@dataclass(frozen=True)
class RequestOutcome:
    request: workloads.Request
    ttft: float
    tpot: float
    """Mean seconds per output token after the first (0 for a single token)."""
    finish: float


@dataclass(frozen=True)
class TimelinePoint:
    time: float
    prefill: int
    """Workers of the role asked for (provisioning, serving or draining)."""
    decode: int
    ttft: float | None
    """The percentile over the last ``timeline_step`` of requests that got a first token."""
    tpot: float | None


@dataclass(frozen=True)
class Decision:
    time: float
    role: roles.Role
    before: int
    after: int
    reason: str


@dataclass(frozen=True)
class Result:
    workload: str
    strategy: str
    outcomes: tuple[RequestOutcome, ...]
    gpu_seconds: float
    duration: float
    timeline: tuple[TimelinePoint, ...]
    decisions: tuple[Decision, ...]
    ttft_slo: float
    tpot_slo: float

    def _share(self, ok: Callable[[RequestOutcome], bool]) -> float:
        return sum(1 for o in self.outcomes if ok(o)) / len(self.outcomes) if self.outcomes else 0.0

    @property
    def ttft_attainment(self) -> float:
        return self._share(lambda o: o.ttft <= self.ttft_slo)

    @property
    def tpot_attainment(self) -> float:
        return self._share(lambda o: o.tpot <= self.tpot_slo)

    @property
    def attainment(self) -> float:
        """Share of requests within both SLOs."""
        return self._share(lambda o: o.ttft <= self.ttft_slo and o.tpot <= self.tpot_slo)

    @property
    def goodput(self) -> float:
        """Requests per second that met both SLOs."""
        return self.attainment * len(self.outcomes) / self.duration

    @property
    def mean_gpus(self) -> float:
        return self.gpu_seconds / self.duration

    def percentile(self, metric: Literal["ttft", "tpot"], q: float) -> float:
        values = sorted(o.ttft if metric == "ttft" else o.tpot for o in self.outcomes)
        return quantile(values, q) if values else math.nan


def quantile(sorted_values: Sequence[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def oscillations(decisions: Iterable[Decision], role: roles.Role, within: float) -> int:
    """Up-down-up (or down-up-down) reversals of a role's size that happened within
    ``within`` seconds: the flapping a stabilization window should prevent."""
    moves = [(d.time, 1 if d.after > d.before else -1) for d in decisions if d.role == role]
    moves = [m for m in moves if m[1]]
    changes: list[tuple[float, int]] = []
    for t, sign in moves:
        if not changes or changes[-1][1] != sign:
            changes.append((t, sign))
    return sum(
        1
        for a, _, c in zip(changes, changes[1:], changes[2:], strict=False)
        if c[0] - a[0] <= within
    )

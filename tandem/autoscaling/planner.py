"""The autoscaling planner: numbers in, a decision per role out.

``decide(spec, inputs, state, now) -> Plan`` is pure: no I/O, no clock of its own,
no logging. The operator feeds it from Prometheus (:mod:`.prometheus`) on a
timer and writes ``Plan.prefill`` / ``Plan.decode`` to the worker Deployments and
to status; the replay simulator (:mod:`tandem.replay`) feeds it simulated metrics on
virtual time; the tests feed it literals. The planner's memory is
:class:`PlannerState`, a frozen value it returns with every plan and gets back on
the next tick.

How a role's size is chosen, per tick:

1. **Signals → ratios.** Each signal becomes a ratio of observed to target
   (1.0 = on target). Latency and queue are measured on the *warm* workers only
   (ready and past ``warmup``), load (KV usage, prompt tokens/s) on every ready
   one. Prefill follows TTFT, its queue and its prompt load (tokens/s against a
   per-worker capacity, profiled or learned from windows where TTFT broke), as
   workers needed over warm workers; decode follows TPOT, its queue and KV-cache
   usage, also as workers needed (:func:`.capacity.decode_rate`): a decode step's time
   grows with the KV it reads, along a line fitted through recent (KV usage,
   TPOT) ticks or profiled, which sets the KV target from the TPOT objective and
   says how much KV a pool of another size would hold. With ``lead``, the
   rising decode rate and prompt load are forecast that many seconds ahead.
   ``policy: queue`` keeps only the queue ratios.
2. **Ratios → recommendation.** A latency ratio above 1, or a proportional one
   (queue, KV, load) above ``1 + tolerance`` (``1 + load_tolerance`` for KV and
   load, if set: their targets carry their margin already), recommends
   ``ceil(warm * ratio)``
   workers (the HPA's proportional rule). While workers are still starting or
   warming up, latency and queue (which cannot show them yet) ask for nothing
   beyond them:
   pods not ready count as capacity on its way. Otherwise the smallest pool on
   which the ratios, projected as ``ratio * warm / n``, stay under
   ``scale_down_ratio`` (``load_scale_down_ratio`` for KV and load, if set) is
   recommended; when latency is well inside its objective
   and the load is measured in proportion (KV usage, prompt load), the load
   alone sizes it, since latency has a floor no pool size removes. The band
   between ``scale_down_ratio`` and the scale-up threshold is the hysteresis
   that keeps a pool from flapping.
3. **Recommendations → decision** (as the HPA's behavior field): scale up to the
   *lowest* recommendation of the last ``scale_up_stabilization`` (pressure must
   have lasted the whole window), then not again before the same time has passed
   (cooldown); scale down to the *highest* recommendation of the last
   ``scale_down_stabilization``, then not again for ``settle``. Steps are capped
   by ``max_scale_*_step`` and the result by ``replicas.min``/``max``.
4. **GPU budget.** When both roles together want more GPUs than
   ``gpu_budget``, the spare GPUs go one worker at a time to the role under the
   most pressure.

Missing metrics never shrink a pool: the role holds its replicas and the
decision says why (``metrics_available=False``). ``policy: external`` decides
nothing (``replicas is None``: HPA or KEDA own the Deployments), ``policy: off``
holds ``replicas.min``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from tandem import roles
from tandem.autoscaling import capacity
from tandem.operator import api

__all__ = [
    "Action",
    "Cause",
    "Inputs",
    "Limit",
    "MetricsUnavailable",
    "Plan",
    "PlannerSpec",
    "PlannerState",
    "Policy",
    "Pressure",
    "Role",
    "RoleBounds",
    "RoleDecision",
    "RoleInputs",
    "RoleMetrics",
    "RoleState",
    "decide",
    "kv_at_tpot_objective",
    "prefill_utilization",
    "prefill_workers_needed",
    "pressures",
    "run",
    "tpot_line",
]

Role = roles.Role
Policy = api.AutoscalingPolicy
Action = Literal["scale-up", "scale-down", "hold", "none"]
"""``none``: the planner does not own replicas (``policy: external``)."""
Limit = Literal["max", "min", "step", "gpu-budget"]
Signal = Literal["ttft", "tpot", "queue", "kv", "load"]

_EPSILON = 1e-9


# ---------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class RoleBounds:
    """Replica bounds of one role."""

    min: int = 1
    """Fewest workers."""
    max: int = 1
    """Most workers."""
    tensor_parallel_size: int = 1
    """GPUs per worker, for the GPU budget."""

    def clamp(self, replicas: int) -> int:
        return max(self.min, min(self.max, replicas))


@dataclass(frozen=True)
class PlannerSpec:
    """What the planner aims for: the pool's SLOs, bounds and autoscaling settings
    (all durations in seconds), plus tunables the CRD does not expose."""

    policy: Policy = "slo"
    """``slo``, ``queue``, ``external`` or ``off`` (see the module docstring)."""
    ttft: float = 1.0
    """TTFT objective, seconds."""
    tpot: float = 0.1
    """TPOT objective, seconds."""
    percentile: float = 90
    """The percentile both objectives are measured at."""
    prefill: RoleBounds = field(default_factory=RoleBounds)
    """Bounds of the prefill pool."""
    decode: RoleBounds = field(default_factory=RoleBounds)
    """Bounds of the decode pool."""
    aggregated: bool = False
    """No prefill pool: decode workers prefill too, so decode also follows TTFT."""
    interval: float = 15.0
    """Seconds between ticks; used only to tolerate jitter in window coverage."""
    scale_up_stabilization: float = 30.0
    """Pressure must last this long before a scale-up; also the cooldown after one."""
    scale_down_stabilization: float = 300.0
    """Slack must last this long before a scale-down (highest recommendation wins)."""
    max_scale_up_step: int = 2
    """Most workers added by one decision."""
    max_scale_down_step: int = 1
    """Most workers removed by one decision."""
    target_queue_per_replica: float = 4.0
    """Waiting requests per warm worker that count as full pressure (ratio 1)."""
    settle: float = 60.0
    """After a scale-down, no further scale-down for this long, so that the
    signals (measured over a window) reflect the smaller pool first."""
    gpu_budget: int | None = None
    """Most GPUs both pools may hold together (``tensor_parallel_size`` each)."""
    tolerance: float = 0.1
    """A ratio must exceed ``1 + tolerance`` to recommend a scale-up (the HPA's 10%)."""
    kv_target: float = 0.8
    """KV-cache usage of a decode worker that counts as full (ratio 1): past it,
    vLLM starts queueing and preempting."""
    lead: float = 0.0
    """Seconds ahead to forecast rising KV usage and prompt load along their trend
    over the window, so that workers are asked for before the pressure arrives:
    about ``scale_up_stabilization`` plus the time a new worker takes to serve.
    0 (the default) plans on what is measured only."""
    tpot_line: tuple[float, float] | None = None
    """``(floor, slope)`` of TPOT in seconds against mean KV usage, if known
    (profiled, e.g. from the GPU's roofline); a line fitted at run time replaces
    it where it reaches the objective at a lower usage (see :func:`tpot_line`)."""
    tpot_headroom: float = 0.8
    """Decode KV usage is held to this fraction of the usage at which TPOT would
    reach its objective (see :func:`kv_at_tpot_objective`)."""
    fit_samples: int = 40
    """(KV usage, TPOT) ticks kept for that fit."""
    fit_min_samples: int = 8
    """Ticks needed before the fit is used."""
    fit_min_spread: float = 0.03
    """Standard deviation of KV usage the ticks must show before the fit is used."""
    scale_down_ratio: float = 0.8
    """A smaller pool is recommended only if every ratio, projected onto it, stays
    below this: the hysteresis band under ``1 + tolerance``."""
    load_tolerance: float | None = None
    """Tolerance of the load signals, KV usage and prompt load (``tolerance`` when
    None). Their targets already carry the SLO's margin (the TPOT line's headroom,
    the queueing model's edge of the TTFT objective), so 0 acts on them."""
    load_scale_down_ratio: float | None = None
    """``scale_down_ratio`` of the load signals, KV usage and prompt load
    (``scale_down_ratio`` when None)."""
    prefill_utilization: float = 0.9
    """Most of a prefill worker's capacity (prompt tokens/s) the pool is sized for.
    The pool's own size lowers it further: see :func:`prefill_utilization`."""
    prefill_capacity: float | None = None
    """Prompt tokens/s one prefill worker sustains, if known (profiled, e.g. from
    the GPU's roofline). When None the planner learns it: the load per worker of
    windows in which TTFT went past its objective or the queue past its target."""

    def bounds(self, role: Role) -> RoleBounds:
        return self.prefill if role == "prefill" else self.decode

    @property
    def percentile_label(self) -> str:
        return f"p{self.percentile:g}"

    @classmethod
    def from_api(
        cls, spec: api.InferencePoolSpec, **tunables: float | tuple[float, float] | None
    ) -> PlannerSpec:
        """The planner's view of an InferencePool spec; ``tunables`` override the
        fields the CRD does not carry (``tolerance``, ``kv_target``, ...)."""
        a = spec.autoscaling

        def bounds(role: api.RoleSpec) -> RoleBounds:
            r = role.replicas
            return RoleBounds(r.min, r.max, role.tensor_parallel_size)

        base = cls(
            policy=a.policy,
            ttft=api.parse_duration(spec.slo.ttft),
            tpot=api.parse_duration(spec.slo.tpot),
            percentile=spec.slo.percentile,
            prefill=bounds(spec.prefill),
            decode=bounds(spec.decode),
            aggregated=spec.mode == "aggregated",
            interval=api.parse_duration(a.interval),
            scale_up_stabilization=api.parse_duration(a.scale_up_stabilization),
            scale_down_stabilization=api.parse_duration(a.scale_down_stabilization),
            max_scale_up_step=a.max_scale_up_step,
            max_scale_down_step=a.max_scale_down_step,
            target_queue_per_replica=a.target_queue_per_replica,
            settle=api.parse_duration(a.window),
            gpu_budget=a.gpu_budget,
            lead=api.parse_duration(a.forecast) if a.forecast else 0.0,
            prefill_capacity=a.prefill_capacity,
            tpot_line=(
                (
                    api.parse_duration(a.decode_step.base),
                    api.parse_duration(a.decode_step.per_kv_usage),
                )
                if a.decode_step
                else None
            ),
            load_tolerance=a.load_tolerance,
            load_scale_down_ratio=a.load_scale_down_ratio,
        )
        return replace(base, **tunables)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class RoleMetrics:
    """One role's signals over the window, from warm workers only (ready and
    older than ``warmup``); ``None`` where there was nothing to measure (no
    request finished in the window), which is not the same as unavailable."""

    queue_depth: float = 0.0
    """Requests waiting for this role (engine queues, plus the router's for it)."""
    ttft: float | None = None
    """TTFT at the SLO percentile, seconds."""
    tpot: float | None = None
    """TPOT (inter-token latency) at the SLO percentile, seconds."""
    kv_usage: float | None = None
    """Mean KV-cache usage of the warm workers, 0 to 1."""
    request_rate: float | None = None
    """Requests/s the role finished."""
    prompt_token_rate: float | None = None
    """Prompt tokens/s the role prefilled (prefill's proportional load)."""


Cause = Literal[
    "PrometheusUnreachable", "QueryFailed", "NoTargets", "MetricsMissing", "MetricsUnavailable"
]
"""Why a role's signals are unavailable, as the ``MetricsAvailable`` condition's
reason: Prometheus did not answer, refused a query, scraped no worker of the
role, lacks a required metric; or something else."""


@dataclass(frozen=True)
class MetricsUnavailable:
    """The signals could not be read; the role holds its size."""

    reason: str
    """Why, for people, e.g. "Prometheus unreachable: connection refused"."""
    cause: Cause = field(default="MetricsUnavailable", compare=False)
    """Why, for programs (the condition's reason): chosen where the failure is found,
    never read back from ``reason``, so rewording a message changes no condition.
    ``==`` compares the text only, as before this field existed, so a value written
    as ``MetricsUnavailable(text)`` still matches a classified one."""


@dataclass(frozen=True)
class RoleInputs:
    """What the planner knows about one role at a tick."""

    replicas: int
    """Workers currently wanted (the Deployment's ``spec.replicas``)."""
    ready: int
    """Workers ready to serve."""
    metrics: RoleMetrics | MetricsUnavailable
    warming: int = 0
    """Ready workers younger than ``warmup``: capacity, but not a source of signals."""

    @property
    def pending(self) -> int:
        """Workers wanted but not ready: capacity on its way."""
        return max(0, self.replicas - self.ready)

    @property
    def warm(self) -> int:
        """Workers the signals come from."""
        return max(0, self.ready - self.warming)


@dataclass(frozen=True)
class Inputs:
    """A tick's inputs: one per role (``prefill`` is None in aggregated mode)."""

    decode: RoleInputs
    prefill: RoleInputs | None = None


# ---------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class RoleState:
    """The planner's memory of one role."""

    history: tuple[tuple[float, int], ...] = ()
    """``(time, recommended replicas)`` of recent ticks, oldest first."""
    since: float | None = None
    """Time of the first tick of the unbroken history (for window coverage)."""
    last_scale_up: float | None = None
    last_scale_down: float | None = None
    capacity: float | None = None
    """Learned prompt tokens/s a prefill worker sustains (prefill only)."""
    trend: tuple[tuple[float, float | None, int, float | None], ...] = ()
    """(time, mean KV usage, ready workers, prompt tokens/s) over the last window,
    for forecasts; the load is None at a tick whose queue was over its target."""
    samples: tuple[tuple[float, float], ...] = ()
    """Recent (KV usage, TPOT) pairs (decode only), for :func:`kv_at_tpot_objective`."""


@dataclass(frozen=True)
class PlannerState:
    """Everything the planner remembers between ticks."""

    prefill: RoleState = field(default_factory=RoleState)
    decode: RoleState = field(default_factory=RoleState)

    def role(self, role: Role) -> RoleState:
        return self.prefill if role == "prefill" else self.decode


# ---------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class Pressure:
    """One signal against its target."""

    signal: Signal
    observed: float
    target: float
    ratio: float
    """``observed / target`` on the warm workers: 1.0 is on target."""
    text: str
    """Human-readable, e.g. "TTFT p90 820ms"; the target is added by :meth:`describe`."""

    def describe(self) -> str:
        """``text`` against the target, e.g. "TTFT p90 820ms > 500ms"."""
        rel = ">" if self.ratio > 1 else "<="
        if self.signal in ("ttft", "tpot"):
            return f"{self.text} {rel} {api.format_duration(self.target)}"
        if self.signal == "kv":
            return f"{self.text} {rel} {self.target:.0%}"
        if self.signal == "load":
            return f"{self.text} {rel} {self.target:.0f} tok/s"
        return f"{self.text} (target {self.target:.3g})"


@dataclass(frozen=True)
class RoleDecision:
    """What to do with one role."""

    role: Role
    current: int
    """``replicas`` in the inputs."""
    replicas: int | None
    """The replicas to write; None: do not write (``policy: external``)."""
    action: Action
    reason: str
    """Why, self-contained, e.g. "prefill 2→3: TTFT p90 820ms > 500ms"."""
    recommendation: int | None = None
    """This tick's raw recommendation, before stabilization and limits."""
    pressure: float | None = None
    """The highest signal ratio (1.0 = on target); None without metrics."""
    limited_by: Limit | None = None
    """What kept the decision below (or above) the recommendation."""
    metrics_available: bool = True

    @property
    def changed(self) -> bool:
        return self.replicas is not None and self.replicas != self.current


@dataclass(frozen=True)
class Plan:
    """A tick's decisions and the state to pass to the next tick."""

    decode: RoleDecision
    prefill: RoleDecision | None
    state: PlannerState

    @property
    def decisions(self) -> tuple[RoleDecision, ...]:
        return tuple(d for d in (self.prefill, self.decode) if d is not None)

    @property
    def limited(self) -> bool:
        """Whether a bound, a step or the budget held a role back (ScalingLimited)."""
        return any(d.limited_by is not None for d in self.decisions)


# ---------------------------------------------------------------------------
# Signals → pressure


def _ms(seconds: float) -> str:
    return api.format_duration(seconds)


def _ahead(
    spec: PlannerSpec, past: Sequence[tuple[float, float]], value: float, now: float
) -> float:
    """``value`` extrapolated ``spec.lead`` seconds ahead along its rise over
    ``past`` (a fall is not extrapolated: scale-downs never act on a forecast).

    The rise is the least-squares slope through every point of ``past`` and
    ``(now, value)``: each sample is noisy, and the line through the two ends
    alone, stretched over the lead, is the noisiest estimate of it (a spurious
    rise asks for workers, and resets the scale-down window)."""
    if spec.lead <= 0 or not past or now - past[0][0] < max(spec.settle / 2, _EPSILON):
        return value
    points = [*past, (now, value)] if past[-1][0] < now - _EPSILON else list(past)
    times, values = zip(*points, strict=True)
    slope = statistics.linear_regression(times, values).slope
    return value + max(0.0, slope) * spec.lead


def pressures(
    spec: PlannerSpec, role: Role, inputs: RoleInputs, state: RoleState, now: float = 0.0
) -> tuple[Pressure, ...]:
    """Every signal of ``role`` as a ratio to its target (see the module docstring);
    KV usage and prompt load as forecast ``lead`` seconds ahead."""
    m = inputs.metrics
    if isinstance(m, MetricsUnavailable):
        return ()
    warm = max(1, inputs.warm)
    pct = spec.percentile_label
    out: list[Pressure] = []
    queue_target = spec.target_queue_per_replica * warm
    out.append(
        Pressure(
            "queue",
            m.queue_depth,
            queue_target,
            m.queue_depth / queue_target,
            f"queue {m.queue_depth:.3g}",
        )
    )
    if spec.policy == "queue":
        return tuple(out)
    follows_ttft = role == "prefill" or spec.aggregated
    if follows_ttft and m.ttft is not None:
        out.append(
            Pressure("ttft", m.ttft, spec.ttft, m.ttft / spec.ttft, f"TTFT {pct} {_ms(m.ttft)}")
        )
    if role == "decode":
        if m.tpot is not None:
            out.append(
                Pressure("tpot", m.tpot, spec.tpot, m.tpot / spec.tpot, f"TPOT {pct} {_ms(m.tpot)}")
            )
        if m.kv_usage is not None:
            target = spec.kv_target
            line = tpot_line(spec, state)
            edge = kv_at_tpot_objective(spec, state)
            if edge is not None:
                target = max(0.01, min(target, spec.tpot_headroom * edge))
            # The trend is of the pool's decode rate (its load), not of the mean
            # usage, which jumps whenever a worker comes or goes.
            past = [
                (t, capacity.decode_rate(kv, n, line))
                for t, kv, n, _ in state.trend
                if kv is not None
            ]
            ready = max(1, inputs.ready)
            rate = _ahead(spec, past, capacity.decode_rate(m.kv_usage, ready, line), now)
            kv = capacity.kv_usage_on(rate, ready, line)
            text = f"KV usage {m.kv_usage:.0%}"
            if kv > m.kv_usage + 0.005:
                rising = f"{kv:.0%}" if math.isfinite(kv) else "full"
                text += f" (rising: {rising} in {_ms(spec.lead)})"
            # As a ratio of workers needed to workers measured (see
            # decode_rate): ``ceil(warm * ratio)`` is the pool that fits.
            needed = capacity.decode_workers_needed(rate, target, line)
            out.append(Pressure("kv", kv, target, needed / warm, text))
    if role == "prefill" and m.prompt_token_rate is not None:
        per_worker = spec.prefill_capacity or state.capacity
        if per_worker:
            service = None
            if m.request_rate and m.prompt_token_rate > 0:
                service = m.prompt_token_rate / m.request_rate / per_worker
            target = per_worker * prefill_utilization(spec, warm, service) * warm
            past = [(t, r) for t, _, _, r in state.trend if r is not None]
            load = _ahead(spec, past, m.prompt_token_rate, now)
            text = f"prompt load {m.prompt_token_rate:.0f} tok/s"
            if load > m.prompt_token_rate * 1.005:
                text += f" (rising: {load:.0f} in {_ms(spec.lead)})"
            # The ratio is of workers needed (each size at its own utilization) to
            # workers measured, so that ``ceil(warm * ratio)`` is the pool that fits.
            needed = prefill_workers_needed(spec, load / per_worker, service)
            out.append(Pressure("load", load, target, needed / warm, text))
    return tuple(out)


def prefill_utilization(spec: PlannerSpec, workers: int, service: float | None) -> float:
    """The share of its capacity a prefill pool of ``workers`` may run at and still
    keep TTFT within the objective at the SLO percentile: the highest utilization
    (at most ``spec.prefill_utilization``) at which the queueing delay's
    percentile, plus the mean prefill time ``service`` (seconds), stays within the
    TTFT objective. One worker must run far below capacity for that, ten nearly
    full: a pool's spare room shrinks as it grows. Without a service time (no
    request finished in the window) it is ``spec.prefill_utilization``."""
    cap = spec.prefill_utilization
    if service is None or service <= 0:
        return cap
    n, wait, q = max(1, workers), spec.ttft - service, spec.percentile / 100
    if capacity.queue_wait_quantile_ok(n, cap, service, wait, q):
        return cap
    lo, hi = 0.0, cap
    for _ in range(30):
        mid = (lo + hi) / 2
        if capacity.queue_wait_quantile_ok(n, mid, service, wait, q):
            lo = mid
        else:
            hi = mid
    return max(lo, _MIN_UTILIZATION)


def prefill_workers_needed(spec: PlannerSpec, offered: float, service: float | None) -> float:
    """Prefill workers for ``offered`` load (in workers: prompt tokens/s over one
    worker's capacity), each pool size at its :func:`prefill_utilization`;
    fractional between sizes, so that ``ceil`` of it is the smallest pool that fits."""
    if offered <= 0:
        return 0.0
    below = 0.0  # load the pool of n - 1 workers carries
    for n in range(1, 4097):
        fits = n * prefill_utilization(spec, n, service)
        if offered <= fits:
            return n - 1 + (offered - below) / max(fits - below, _EPSILON)
        below = fits
    return offered / spec.prefill_utilization


_MIN_UTILIZATION = 0.05
"""Floor of :func:`prefill_utilization` (an objective no pool size can meet)."""


def tpot_line(spec: PlannerSpec, state: RoleState) -> tuple[float, float] | None:
    """``(floor, slope)`` of TPOT (seconds) against mean KV usage (0 to 1): a
    least-squares line through recent (KV usage, TPOT) ticks once they span enough
    range, or ``spec.tpot_line`` (profiled); with both, the one that reaches the
    objective at the lower usage; None with neither.

    A decode step reads the weights and every held KV token, so its time, and the
    TPOT, grows about linearly with KV usage above a floor no replica count
    removes: the line turns KV usage, a proportional gauge, into the leading
    signal for the TPOT objective."""
    fitted = _fit(spec, state.samples)
    profiled = spec.tpot_line
    if fitted is None or profiled is None:
        return fitted or profiled
    # Both: the one that reaches the objective at the lower usage. Ticks from a
    # lightly loaded pool span little range and can fit a line far too flat.
    return min((fitted, profiled), key=lambda line: (spec.tpot - line[0]) / line[1])


def _fit(spec: PlannerSpec, pairs: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares through (KV usage, TPOT) pairs; None without enough of them,
    enough spread, or a rising line under the objective."""
    n = len(pairs)
    if n < spec.fit_min_samples:
        return None
    mean_k = sum(k for k, _ in pairs) / n
    mean_t = sum(t for _, t in pairs) / n
    var_k = sum((k - mean_k) ** 2 for k, _ in pairs) / n
    if var_k < spec.fit_min_spread**2:
        return None
    slope = sum((k - mean_k) * (t - mean_t) for k, t in pairs) / n / var_k
    floor = mean_t - slope * mean_k
    return (floor, slope) if slope > 0 and floor < spec.tpot else None


def kv_at_tpot_objective(spec: PlannerSpec, state: RoleState) -> float | None:
    """The mean KV usage at which TPOT would reach its objective, on
    :func:`tpot_line`; None without a line."""
    line = tpot_line(spec, state)
    if line is None:
        return None
    floor, slope = line
    return (spec.tpot - floor) / slope


def _remember_pair(spec: PlannerSpec, inputs: RoleInputs, state: RoleState) -> RoleState:
    m = inputs.metrics
    if isinstance(m, MetricsUnavailable) or m.kv_usage is None or m.tpot is None or inputs.warm < 1:
        return state
    return replace(state, samples=(*state.samples, (m.kv_usage, m.tpot))[-spec.fit_samples :])


def _remember_trend(
    spec: PlannerSpec, inputs: RoleInputs, state: RoleState, now: float
) -> RoleState:
    m = inputs.metrics
    if isinstance(m, MetricsUnavailable) or inputs.warm < 1:
        return state
    kept = tuple(row for row in state.trend if row[0] >= now - spec.settle - _EPSILON)
    # A pool with a line waiting runs at its capacity: what it serves then is not
    # the demand, and when workers join, the line moving onto them looks like a
    # rise in demand. Such a tick is no sample of the trend.
    if m.queue_depth > spec.target_queue_per_replica * inputs.warm:
        return replace(state, trend=(*kept, (now, None, inputs.ready, None)))
    return replace(state, trend=(*kept, (now, m.kv_usage, inputs.ready, m.prompt_token_rate)))


def _learn_capacity(spec: PlannerSpec, inputs: RoleInputs, state: RoleState) -> float | None:
    """Prompt tokens/s a prefill worker sustains within the TTFT objective: the
    load per worker seen when TTFT went past the objective or the queue past its
    target (averaged with what was known), raised whenever a worker is seen
    doing more without either."""
    m = inputs.metrics
    known = state.capacity
    if (
        spec.prefill_capacity is not None
        or isinstance(m, MetricsUnavailable)
        or m.prompt_token_rate is None
        or inputs.warm < 1
        or m.prompt_token_rate <= 0
    ):
        return known
    per_worker = m.prompt_token_rate / inputs.warm
    saturated = m.queue_depth >= spec.target_queue_per_replica * inputs.warm or (
        m.ttft is not None and m.ttft > spec.ttft
    )
    if saturated:
        return per_worker if known is None else 0.5 * (known + per_worker)
    if known is not None and per_worker > known:
        return per_worker
    return known


# ---------------------------------------------------------------------------
# Pressure → recommendation


@dataclass(frozen=True)
class _Recommendation:
    replicas: int
    """Within the bounds."""
    wanted: int
    """Before the bounds."""
    top: Pressure | None
    """The signal that decided."""


_LAGGING: frozenset[Signal] = frozenset({"ttft", "tpot", "queue"})
_LATENCY: frozenset[Signal] = frozenset({"ttft", "tpot"})
_PROPORTIONAL: frozenset[Signal] = frozenset({"kv", "load"})


def _threshold(spec: PlannerSpec, p: Pressure) -> float:
    """The ratio past which a signal asks for more: latency objectives at once (a
    percentile over the objective is already a miss), proportional signals past
    the tolerance."""
    if p.signal in _LATENCY:
        return 1.0
    if p.signal in _PROPORTIONAL and spec.load_tolerance is not None:
        return 1 + spec.load_tolerance
    return 1 + spec.tolerance


def _down_ratio(spec: PlannerSpec, p: Pressure) -> float:
    """The ratio a signal, projected onto a smaller pool, must stay under."""
    if p.signal in _PROPORTIONAL and spec.load_scale_down_ratio is not None:
        return spec.load_scale_down_ratio
    return spec.scale_down_ratio


def _recommend(
    spec: PlannerSpec, inputs: RoleInputs, signals: Sequence[Pressure], bounds: RoleBounds
) -> _Recommendation:
    """The pool size this tick's signals ask for (see the module docstring)."""
    current, warm = inputs.replicas, inputs.warm
    if not signals:
        return _Recommendation(current, current, None)
    top = max(signals, key=lambda p: p.ratio)
    breaching = [p for p in signals if p.ratio > _threshold(spec, p)]
    if inputs.pending or inputs.warming:
        # Latency and queue lag: they cannot show the workers still starting (or
        # just started) yet, so they ask for nothing beyond them. A forecast of
        # load still can.
        lagging = [p for p in breaching if p.signal in _LAGGING]
        breaching = [p for p in breaching if p.signal not in _LAGGING]
        if lagging and not breaching:
            top = max(lagging, key=lambda p: p.ratio)
            return _Recommendation(current, current, top)
    if breaching:
        top = max(breaching, key=lambda p: p.ratio)
        wanted = math.ceil(max(warm, 1) * top.ratio - _EPSILON)
        # Under pressure never recommend fewer than there are (some may be on the way).
        return _Recommendation(bounds.clamp(max(wanted, current)), wanted, top)
    if inputs.pending or inputs.warming:
        wanted = current  # part of the pool is not measured yet: no scale-down
    else:
        # The smallest pool on which the ratios, scaled by warm/n, stay in the band.
        # Latency has a floor no pool size removes (the service time itself), so
        # when the load is measured in proportion (KV usage, prompt load) and
        # latency is comfortably inside its objective, the load alone sizes the
        # pool; otherwise latency is projected too, which is conservative.
        basis = list(signals)
        proportional = [p for p in signals if p.signal in _PROPORTIONAL]
        latency_ok = all(p.ratio <= spec.scale_down_ratio for p in signals if p.signal in _LATENCY)
        if proportional and latency_ok:
            basis = [p for p in signals if p.signal not in _LATENCY]
        top = max(basis, key=lambda p: p.ratio / _down_ratio(spec, p))
        wanted = min(
            current, max(1, math.ceil(warm * top.ratio / _down_ratio(spec, top) - _EPSILON))
        )
    return _Recommendation(bounds.clamp(wanted), wanted, top)


# ---------------------------------------------------------------------------
# Recommendation → decision


def _window(history: Sequence[tuple[float, int]], now: float, seconds: float) -> list[int]:
    return [n for t, n in history if t >= now - seconds - _EPSILON]


def _lasted(
    history: Sequence[tuple[float, int]], now: float, holds: Callable[[int], bool]
) -> float:
    """How long the recommendations have satisfied ``holds`` without a break."""
    start = now
    for t, n in reversed(history):
        if not holds(n):
            break
        start = t
    return now - start


def _verdict(role: Role, current: int, to: int | None) -> tuple[Action, str]:
    if to is None:
        return "none", role
    if to > current:
        return "scale-up", f"{role} {current}→{to}"
    if to < current:
        return "scale-down", f"{role} {current}→{to}"
    return "hold", f"{role} holds at {current}"


def _decision(
    role: Role,
    current: int,
    to: int | None,
    why: str,
    rec: _Recommendation | None = None,
    limit: Limit | None = None,
    available: bool = True,
) -> RoleDecision:
    action, head = _verdict(role, current, to)
    return RoleDecision(
        role=role,
        current=current,
        replicas=to,
        action=action,
        reason=f"{head}: {why}",
        recommendation=rec.replicas if rec else None,
        pressure=rec.top.ratio if rec and rec.top else None,
        limited_by=limit,
        metrics_available=available,
    )


def _decide_role(
    spec: PlannerSpec, role: Role, inputs: RoleInputs, state: RoleState, now: float
) -> tuple[RoleDecision, RoleState]:
    bounds = spec.bounds(role)
    current = inputs.replicas

    if spec.policy == "external":
        why = "policy external: replicas are owned by HPA/KEDA, not Tandem"
        return _decision(role, current, None, why), state
    if spec.policy == "off":
        return _decision(
            role, current, bounds.min, "autoscaling off: holding replicas.min"
        ), RoleState()
    # Out of bounds (the spec changed): back inside at once, whatever the signals.
    if current < bounds.min:
        return _decision(
            role, current, bounds.min, f"below replicas.min {bounds.min}", limit="min"
        ), state
    if current > bounds.max:
        return _decision(
            role, current, bounds.max, f"above replicas.max {bounds.max}", limit="max"
        ), state

    m = inputs.metrics
    if isinstance(m, MetricsUnavailable):
        # Never shrink blind; and pressure or slack must be seen again in full.
        why = f"metrics unavailable ({m.reason}); keeping the current size"
        return _decision(role, current, current, why, available=False), replace(
            state, history=(), since=None
        )

    if role == "prefill":
        state = replace(state, capacity=_learn_capacity(spec, inputs, state))
    else:
        state = _remember_pair(spec, inputs, state)
    state = _remember_trend(spec, inputs, state, now)
    signals = pressures(spec, role, inputs, state, now)

    # Scale from zero: no worker to measure, but requests are waiting for one.
    if current == 0:
        if m.queue_depth > 0:
            to = max(1, bounds.min)
            why = f"{m.queue_depth:.3g} request(s) waiting and no worker"
            return _decision(role, current, to, why), replace(state, last_scale_up=now)
        return _decision(role, current, current, "no worker and nothing waiting"), state

    rec = _recommend(spec, inputs, signals, bounds)
    since = state.since if state.since is not None else now
    horizon = max(spec.scale_up_stabilization, spec.scale_down_stabilization) + spec.interval
    history = (*((t, n) for t, n in state.history if t >= now - horizon), (now, rec.replicas))
    state = replace(state, history=history, since=since)
    slack = spec.interval / 2

    def covered(seconds: float) -> bool:
        return since <= now - seconds + slack + _EPSILON

    if inputs.warm == 0:
        why = f"{inputs.warming} warming up, {inputs.pending} starting: no signal from a warm worker yet"
        return _decision(role, current, current, why, rec), state
    why = rec.top.describe() if rec.top is not None else "no signal in the window"
    up, down = spec.scale_up_stabilization, spec.scale_down_stabilization

    # Scale up: to the lowest recommendation of the window, once pressure lasted it.
    if rec.replicas > current:
        up_to = min(_window(history, now, up))
        if up_to <= current or not covered(up):
            lasted = _lasted(history, now, lambda n: n > current)
            return _decision(
                role, current, current, f"{why} for {_ms(lasted)} of {_ms(up)}", rec
            ), state
        if state.last_scale_up is not None and now - state.last_scale_up < up - _EPSILON:
            why = f"{why}; cooling down for {_ms(up)} after the last scale-up"
            return _decision(role, current, current, why, rec), state
        to = min(up_to, current + spec.max_scale_up_step)
        limit: Limit | None = "step" if to < up_to else None
        if rec.wanted > bounds.max and to == bounds.max:
            limit = "max"
        return _decision(role, current, to, why, rec, limit), replace(state, last_scale_up=now)
    if rec.top is not None and rec.top.ratio > _threshold(spec, rec.top):
        # More is wanted, but the bound or the workers on their way already cover it.
        if rec.wanted > bounds.max and current >= bounds.max:
            return _decision(role, current, current, f"{why}; at replicas.max", rec, "max"), state
        coming = inputs.pending + inputs.warming
        return _decision(
            role, current, current, f"{why}; {coming} worker(s) on the way", rec
        ), state

    # Scale down: to the highest recommendation of the window.
    if rec.replicas < current:
        down_to = max(_window(history, now, down))
        if down_to >= current or not covered(down):
            lasted = _lasted(history, now, lambda n: n < current)
            why = f"{why}; room to spare for {_ms(lasted)} of {_ms(down)}"
            return _decision(role, current, current, why, rec), state
        if (
            state.last_scale_down is not None
            and now - state.last_scale_down < spec.settle - _EPSILON
        ):
            return _decision(
                role, current, current, f"{why}; settling after a scale-down", rec
            ), state
        to = max(down_to, current - spec.max_scale_down_step)
        why = f"{why}, room to spare for {_ms(down)}"
        return _decision(role, current, to, why, rec, "step" if to > down_to else None), replace(
            state, last_scale_down=now
        )
    if inputs.pending or inputs.warming:
        return _decision(role, current, current, f"{why}; waiting for starting workers", rec), state
    return _decision(role, current, current, f"{why}: on target", rec), state


# ---------------------------------------------------------------------------
# GPU budget


def _share_budget(
    spec: PlannerSpec, decisions: dict[Role, RoleDecision]
) -> dict[Role, RoleDecision]:
    """Fit both roles into ``gpu_budget``: scale-downs and holds first, then the
    spare GPUs one worker at a time to the role whose pressure, spread over the
    workers it would have, is highest."""
    budget = spec.gpu_budget
    owned = {r: d for r, d in decisions.items() if d.replicas is not None}
    if budget is None or not owned:
        return decisions
    tp = {r: spec.bounds(r).tensor_parallel_size for r in owned}
    target = {r: d.replicas for r, d in owned.items() if d.replicas is not None}
    base = {r: min(target[r], owned[r].current) for r in owned}
    # A budget lowered under what runs: shed from the role under least pressure.
    for _ in range(sum(base.values()) + 1):
        if sum(base[r] * tp[r] for r in base) <= budget:
            break
        shrinkable = [r for r in base if base[r] > spec.bounds(r).min]
        if not shrinkable:
            break
        victim = min(shrinkable, key=lambda r: (owned[r].pressure or 0.0) / base[r])
        base[victim] -= 1
    granted = dict(base)
    spare = budget - sum(granted[r] * tp[r] for r in granted)
    for _ in range(sum(target.values()) + 1):
        wanting = [r for r in granted if granted[r] < target[r] and tp[r] <= spare]
        if not wanting:
            break
        pick = max(
            wanting,
            key=lambda r: (
                (owned[r].pressure or 0.0) * max(base[r], 1) / max(granted[r], 1),
                r == "decode",
            ),
        )
        granted[pick] += 1
        spare -= tp[pick]
    out = dict(decisions)
    for r, d in owned.items():
        if granted[r] == target[r]:
            continue
        gpus = sum(granted[x] * tp[x] for x in granted)
        note = f"GPU budget {budget}: wanted {target[r]}, got {granted[r]} ({gpus} GPUs in use)"
        action, head = _verdict(r, d.current, granted[r])
        body = d.reason.split(": ", 1)[1] if ": " in d.reason else d.reason
        out[r] = replace(
            d,
            replicas=granted[r],
            action=action,
            reason=f"{head}: {body}; {note}",
            limited_by="gpu-budget",
        )
    return out


# ---------------------------------------------------------------------------
# The tick


def decide(spec: PlannerSpec, inputs: Inputs, state: PlannerState, now: float) -> Plan:
    """One tick of the planner: a decision per role and the state for the next tick."""
    roles: dict[Role, RoleInputs] = {"decode": inputs.decode}
    if inputs.prefill is not None and not spec.aggregated:
        roles["prefill"] = inputs.prefill
    decisions: dict[Role, RoleDecision] = {}
    states: dict[Role, RoleState] = {"prefill": state.prefill, "decode": state.decode}
    for role, role_inputs in roles.items():
        decisions[role], states[role] = _decide_role(spec, role, role_inputs, states[role], now)
    decisions = _share_budget(spec, decisions)
    # A scale-up the budget refused did not happen: no cooldown for it.
    for role, d in decisions.items():
        if d.limited_by == "gpu-budget" and d.replicas is not None and d.replicas <= d.current:
            states[role] = replace(states[role], last_scale_up=state.role(role).last_scale_up)
    return Plan(
        decode=decisions["decode"],
        prefill=decisions.get("prefill"),
        state=PlannerState(prefill=states["prefill"], decode=states["decode"]),
    )


def run(
    spec: PlannerSpec,
    ticks: Iterable[tuple[float, Inputs]],
    state: PlannerState | None = None,
) -> list[Plan]:
    """Feed ``(now, inputs)`` ticks in order, threading the state; every plan."""
    plans: list[Plan] = []
    current = state or PlannerState()
    for now, inputs in ticks:
        plan = decide(spec, inputs, current, now)
        plans.append(plan)
        current = plan.state
    return plans

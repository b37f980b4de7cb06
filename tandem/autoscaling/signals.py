"""The planner's signals, computed once: a role's snapshot in, its inputs out.

Every source of autoscaling data (Prometheus in a cluster, direct scrapes in local
mode and the embedded source, the replay's simulated workers) only *fetches* the
raw quantities of a :class:`Snapshot`; :func:`role_inputs` applies the rules that
make them the planner's :class:`~.planner.RoleInputs`, so the three cannot drift:

- **Queue**: the engines' own queues (``vllm:num_requests_waiting``) of the warm
  workers, plus, for decode, the router's admission queue
  (``tandem_router_queued_requests``: requests the router holds because every
  decode worker is at its in-flight limit). The router never queues for prefill.
- **Latency** (TTFT, TPOT at the SLO percentile): from warm workers only (ready
  and older than ``warmup``); a cold worker's first requests are slow.
- **Load** (mean KV-cache usage, finished requests/s, prompt tokens/s): from every
  ready worker; what a warming worker carries is load all the same.
- **Availability**: no worker scraped, or a required family absent, makes the
  role's metrics unavailable (with the reason), never zeros; an empty window (no
  request finished) is ``None``, not unavailable.

The pool's **SLO attainment** (the share of recent requests that met the objectives,
``tandem_router_slo_*``) is the router's own count, not a planner input: the decode
snapshot carries it to the status. Several router replicas are weighed by their
requests (:func:`attainment`), as the PromQL of :mod:`.prometheus` does.

The histogram maths that the scrape and replay paths need (PromQL's
``histogram_quantile``) is here too, so Prometheus and the local paths agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tandem import roles, vllm_metrics
from tandem.autoscaling import planner

__all__ = [
    "OBJECTIVES",
    "ROUTER_QUEUED",
    "ROUTER_SLO_ATTAINMENT",
    "ROUTER_SLO_REQUESTS",
    "PoolAttainment",
    "Reading",
    "RouterAttainment",
    "Snapshot",
    "attainment",
    "histogram_quantile",
    "metrics",
    "required",
    "role_inputs",
]

WAITING = vllm_metrics.NUM_REQUESTS_WAITING
RUNNING = vllm_metrics.NUM_REQUESTS_RUNNING
KV_USAGE = vllm_metrics.KV_CACHE_USAGE_PERC
TTFT = vllm_metrics.TIME_TO_FIRST_TOKEN_SECONDS
ITL = vllm_metrics.INTER_TOKEN_LATENCY_SECONDS
SUCCESS = vllm_metrics.REQUEST_SUCCESS + "_total"
PROMPT_TOKENS = vllm_metrics.PROMPT_TOKENS + "_total"

ROUTER_QUEUED = "tandem_router_queued_requests"
"""The router's gauge of requests waiting for a decode worker (``router/METRICS.md``)."""
ROUTER_SLO_ATTAINMENT = "tandem_router_slo_attainment"
"""The router's share of recent requests that met an objective (label ``objective``)."""
ROUTER_SLO_REQUESTS = "tandem_router_slo_requests"
"""The router's count of requests in its attainment window."""
OBJECTIVES = ("ttft", "tpot", "both")
"""Values of the ``objective`` label."""


@dataclass(frozen=True)
class Snapshot:
    """One role's raw readings over the window, as a source fetched them."""

    targets: int
    """Workers whose metrics were read (Prometheus: targets up)."""
    warm: int
    """Of those, the ones older than ``warmup``: the only sources of latency and queue."""
    missing: tuple[str, ...] = ()
    """Required families (:func:`required`) that no worker exposes."""
    engine_waiting: float = 0.0
    """Requests in the warm workers' own queues, summed."""
    router_queued: float = 0.0
    """Requests in the router's admission queue."""
    ttft: float | None = None
    """TTFT at the SLO percentile over the warm workers, seconds."""
    tpot: float | None = None
    """Inter-token latency at the SLO percentile over the warm workers, seconds."""
    kv_usage: float | None = None
    """Mean KV-cache usage of every worker read, 0 to 1."""
    request_rate: float | None = None
    """Requests/s finished by every worker read."""
    prompt_token_rate: float | None = None
    """Prompt tokens/s prefilled by every worker read."""
    where: str = ""
    """How the source looked for the workers (e.g. its target selector), for messages."""
    attainment_requests: int | None = None
    """Requests the pool's routers saw finish in their attainment window; None when no
    router reports attainment (not read, or started without ``slo`` settings). Decode
    only, as every attainment field."""
    attainment_ttft: float | None = None
    """Share (0 to 1) of those that met the TTFT objective; None when there were none."""
    attainment_tpot: float | None = None
    """Share that met the TPOT objective."""
    attainment_both: float | None = None
    """Share that met both objectives."""


@dataclass(frozen=True)
class Reading:
    """One role's signals and the targets they came from."""

    role: roles.Role
    snapshot: Snapshot | None
    """What the source read; None when it could not read it."""
    error: str = ""
    """Why there is no snapshot, for people."""
    error_reason: planner.Cause = "MetricsUnavailable"
    """Why there is no snapshot, for the ``MetricsAvailable`` condition."""

    @property
    def metrics(self) -> planner.RoleMetrics | planner.MetricsUnavailable:
        if self.snapshot is None:
            return planner.MetricsUnavailable(self.error, self.error_reason)
        return metrics(self.role, self.snapshot)

    @property
    def targets(self) -> int:
        """Targets of the role that are up."""
        return 0 if self.snapshot is None else self.snapshot.targets

    @property
    def warm(self) -> int:
        """Of those, the ones up for longer than ``warmup`` (the only sources of signals)."""
        return 0 if self.snapshot is None else self.snapshot.warm

    def inputs(self, replicas: int, ready: int) -> planner.RoleInputs:
        """The planner's inputs, given what the Deployment says."""
        if self.snapshot is None:
            return planner.RoleInputs(replicas=replicas, ready=ready, metrics=self.metrics)
        return role_inputs(self.role, self.snapshot, replicas=replicas, ready=ready)


@dataclass(frozen=True)
class RouterAttainment:
    """What one router replica reports: its window's requests and the shares met."""

    requests: float
    shares: dict[str, float]
    """By objective (``ttft``, ``tpot``, ``both``); an objective absent: not reported."""


@dataclass(frozen=True)
class PoolAttainment:
    """The pool's attainment: the :class:`Snapshot` fields ``attainment_*``."""

    requests: int | None = None
    ttft: float | None = None
    tpot: float | None = None
    both: float | None = None


def attainment(routers: Sequence[RouterAttainment]) -> PoolAttainment:
    """The pool's attainment over its router replicas, each weighed by its requests
    (all None when no router reports; the shares None when no request finished)."""
    if not routers:
        return PoolAttainment()
    total = sum(r.requests for r in routers)

    def share(objective: str) -> float | None:
        reporting = [r for r in routers if objective in r.shares and r.requests > 0]
        if total <= 0 or not reporting:
            return None
        return sum(r.shares[objective] * r.requests for r in reporting) / total

    return PoolAttainment(round(total), share("ttft"), share("tpot"), share("both"))


def required(role: roles.Role) -> tuple[str, ...]:
    """Families whose absence makes a role's signals unavailable (histograms by
    their ``_bucket`` series)."""
    if role == "prefill":
        return (WAITING, f"{TTFT}_bucket")
    return (WAITING, f"{ITL}_bucket", KV_USAGE)


def metrics(
    role: roles.Role, snapshot: Snapshot
) -> planner.RoleMetrics | planner.MetricsUnavailable:
    """The role's signals, or why there are none (see the module docstring)."""
    if snapshot.targets == 0:
        where = f" ({snapshot.where})" if snapshot.where else ""
        return planner.MetricsUnavailable(f"no {role} worker is scraped{where}", "NoTargets")
    if snapshot.missing:
        return planner.MetricsUnavailable(
            f"{', '.join(snapshot.missing)} not exposed by the {role} workers", "MetricsMissing"
        )
    queue = snapshot.engine_waiting + (snapshot.router_queued if role == "decode" else 0.0)
    return planner.RoleMetrics(
        queue_depth=queue,
        ttft=snapshot.ttft,
        tpot=snapshot.tpot if role == "decode" else None,
        kv_usage=snapshot.kv_usage if role == "decode" else None,
        request_rate=snapshot.request_rate,
        prompt_token_rate=snapshot.prompt_token_rate if role == "prefill" else None,
    )


def role_inputs(
    role: roles.Role, snapshot: Snapshot, *, replicas: int, ready: int
) -> planner.RoleInputs:
    """The planner's inputs of one role: ``replicas`` wanted, ``ready`` serving (as
    the Deployment or the process table says); ready workers not yet warm count as
    capacity but are no source of signals."""
    warming = max(0, min(ready, snapshot.targets) - snapshot.warm)
    return planner.RoleInputs(
        replicas=replicas, ready=ready, warming=warming, metrics=metrics(role, snapshot)
    )


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """PromQL's ``histogram_quantile`` over cumulative ``(le, count)`` buckets
    (linear within a bucket; the ``+Inf`` bucket answers its lower bound)."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            fraction = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound

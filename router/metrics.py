"""The router's Prometheus metrics, in a registry of its own (one per app).

Counters and histograms are updated on the request path through pre-bound label
children. Gauges of the current state (in-flight, queued, scraped load) cost
nothing per request: a collector reads them from the endpoint sets (and the SLO
attainment from its :class:`~.attainment.Tracker`) when ``/metrics`` is scraped.
The table in ``router/METRICS.md`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.router import attainment, endpoints

__all__ = ["MIGRATIONS", "OBJECTIVES", "OUTCOMES", "PATHS", "RouterMetrics", "StateView"]

OUTCOMES = (
    "ok",
    "invalid",
    "unauthorized",
    "rejected",
    "unavailable",
    "upstream_error",
    "timeout",
    "broken_stream",
    "cancelled",
    "error",
)
"""Values of ``tandem_router_requests_total{outcome}``."""

PATHS = ("disaggregated", "aggregated", "short_prompt", "fallback")
"""Values of ``tandem_router_routed_total{path}``: how a request was served."""

MIGRATIONS = ("ok", "exhausted", "failed")
"""Values of ``tandem_router_migrations_total{outcome}``."""

OBJECTIVES = ("ttft", "tpot", "both")
"""Values of ``tandem_router_slo_attainment{objective}``."""

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip


@dataclass(frozen=True)
class StateView:
    """What the collector reads at scrape time."""

    pool: str
    sets: tuple[endpoints.EndpointSet, ...]
    queued: Callable[[], int]


class _StateCollector(Collector):
    def __init__(self, view: StateView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view
        known = GaugeMetricFamily(
            "tandem_router_endpoints", "Workers known to the router.", labels=["pool", "role"]
        )
        in_flight = GaugeMetricFamily(
            "tandem_router_in_flight_requests",
            "This router's requests on each worker now.",
            labels=["pool", "role", "endpoint"],
        )
        waiting = GaugeMetricFamily(
            "tandem_router_endpoint_waiting_requests",
            "The worker's own queue (vllm:num_requests_waiting), last scraped.",
            labels=["pool", "role", "endpoint"],
        )
        kv = GaugeMetricFamily(
            "tandem_router_endpoint_kv_cache_usage",
            "The worker's KV-cache usage 0..1 (vllm:kv_cache_usage_perc), last scraped.",
            labels=["pool", "role", "endpoint"],
        )
        for eps in view.sets:
            known.add_metric([view.pool, eps.role], len(eps))
            for url, count, load in eps.loads():
                labels = [view.pool, eps.role, url]
                in_flight.add_metric(labels, count)
                waiting.add_metric(labels, load.waiting)
                kv.add_metric(labels, load.kv_usage)
        queued = GaugeMetricFamily(
            "tandem_router_queued_requests",
            "Requests held in the router's queue, waiting for a worker.",
            labels=["pool"],
        )
        queued.add_metric([view.pool], view.queued())
        yield from (known, in_flight, waiting, kv, queued)


class _SloCollector(Collector):
    def __init__(
        self, pool: str, tracker: attainment.Tracker, target: float, clock: Callable[[], float]
    ) -> None:
        self._pool = pool
        self._tracker = tracker
        self._target = target
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        got = self._tracker.read(self._clock())
        shares = GaugeMetricFamily(
            "tandem_router_slo_attainment",
            "Share (0..1) of the window's finished streams that met the objective; "
            "absent when none finished.",
            labels=["pool", "objective"],
        )
        for objective in OBJECTIVES:
            share = getattr(got, objective)
            if share is not None:
                shares.add_metric([self._pool, objective], share)
        requests = GaugeMetricFamily(
            "tandem_router_slo_requests",
            "Streams that finished within the attainment window.",
            labels=["pool"],
        )
        requests.add_metric([self._pool], got.requests)
        target = GaugeMetricFamily(
            "tandem_router_slo_target",
            "The share of requests that should meet the objectives (the SLO percentile).",
            labels=["pool"],
        )
        target.add_metric([self._pool], self._target)
        yield from (shares, requests, target)


class RouterMetrics:
    """Every metric of one router app, bound to its pool label."""

    def __init__(self, pool: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        requests = Counter(
            "tandem_router_requests",
            "Client requests by outcome.",
            ["pool", "outcome"],
            registry=r,
        )
        self.outcome = {o: requests.labels(pool, o) for o in OUTCOMES}
        routed = Counter(
            "tandem_router_routed",
            "Requests sent on to workers, by path: disaggregated (prefill pool then "
            "decode pool), aggregated (decode only, by mode), short_prompt (mode auto "
            "skipped the prefill pool), fallback (the prefill pool failed or was empty).",
            ["pool", "path"],
            registry=r,
        )
        self.routed = {p: routed.labels(pool, p) for p in PATHS}
        self.ttft = Histogram(
            "tandem_router_ttft_seconds",
            "Time to first token as the client sees it (streamed requests): arrival to "
            "the first body chunk of the decode worker.",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(pool)
        self.tpot = Histogram(
            "tandem_router_tpot_seconds",
            "Time per output token after the first (streamed requests), from the "
            "spacing of the stream's events.",
            ["pool"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        ).labels(pool)
        self.duration = Histogram(
            "tandem_router_request_duration_seconds",
            "Arrival to the last byte sent, every request that reached a worker.",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(pool)
        self.prefill_hop = Histogram(
            "tandem_router_prefill_hop_seconds",
            "Duration of the successful prefill hop (request to the prefill worker's "
            "answer with kv_transfer_params).",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(pool)
        self.queue_wait = Histogram(
            "tandem_router_queue_wait_seconds",
            "Time requests spent in the router's queue (only those that had to wait).",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(pool)
        retries = Counter(
            "tandem_router_retries",
            "Attempts repeated on another worker after a failure.",
            ["pool", "role"],
            registry=r,
        )
        self.retries = {role: retries.labels(pool, role) for role in ("prefill", "decode")}
        fallbacks = Counter(
            "tandem_router_fallbacks",
            "Requests prefilled on the decode worker although the mode asked for the "
            "prefill pool, by reason.",
            ["pool", "reason"],
            registry=r,
        )
        self.fallbacks = {
            reason: fallbacks.labels(pool, reason)
            for reason in ("no_prefill_worker", "prefill_failed", "no_kv_params")
        }
        self.upstream_errors = Counter(
            "tandem_router_upstream_errors",
            "Failed attempts on workers (connection, timeout, 5xx), by role.",
            ["pool", "role"],
            registry=r,
        )
        migrations = Counter(
            "tandem_router_migrations",
            "Streams moved to another decode worker after theirs failed mid-stream: ok "
            "(the continuation started), failed (it could not: no other worker, it "
            "failed before its first token, or the stream could not be resumed), "
            "exhausted (the stream broke again with migrationLimit spent).",
            ["pool", "outcome"],
            registry=r,
        )
        self.migrations = {o: migrations.labels(pool, o) for o in MIGRATIONS}
        self.scrape_errors = Counter(
            "tandem_router_scrape_errors",
            "Failed reads of a worker's /metrics.",
            ["pool", "role"],
            registry=r,
        )
        self.slo: attainment.Tracker | None = None
        """Where finished streams are counted against the objectives (None: no SLO set)."""
        self._pool = pool

    def watch(self, view: StateView) -> None:
        """Report the endpoint sets' state on every scrape."""
        self.registry.register(_StateCollector(view))

    def track_slo(
        self, tracker: attainment.Tracker, target: float, clock: Callable[[], float]
    ) -> None:
        """Count finished streams in ``tracker`` and report its attainment on every
        scrape (``target``: the share that should meet the objectives, 0..1)."""
        self.slo = tracker
        self.registry.register(_SloCollector(self._pool, tracker, target, clock))

    def render(self) -> bytes:
        return generate_latest(self.registry)

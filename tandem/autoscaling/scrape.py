"""The planner's inputs from direct scrapes of the workers' ``/metrics``.

The source of local mode (and of any deployment without Prometheus): two scrapes
per worker, the latest and one about ``window`` earlier, become a
:class:`~.signals.Snapshot` the way the PromQL of :mod:`.prometheus` would read
them (histogram bucket deltas → the SLO percentile, counter deltas → rates,
gauges as they are); :func:`.signals.role_inputs` does the rest. The router's
samples (the decode queue, the SLO attainment) may come from several replicas, told
apart by an ``instance`` label the caller adds (:func:`router_attainment`). Pure:
fetching the pages is the caller's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from tandem import roles, vllm_metrics
from tandem.autoscaling import planner, signals

__all__ = [
    "Samples",
    "Scrape",
    "WorkerView",
    "parse",
    "pick_old",
    "role_inputs",
    "router_attainment",
    "snapshot",
]

Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Sample name (colon spelling) → [(labels, value)]."""


def parse(text: str) -> Samples:
    """A Prometheus text page → :data:`Samples` (``vllm_x`` read as ``vllm:x``)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = vllm_metrics.normalize(sample.name)
            out.setdefault(name, []).append((dict(sample.labels), float(sample.value)))
    return out


@dataclass(frozen=True)
class Scrape:
    """One read of a worker's ``/metrics``."""

    time: float
    samples: Samples


@dataclass(frozen=True)
class WorkerView:
    """What the signals are computed from, for one worker."""

    started: float
    """When the worker started (warm-up counts from here)."""
    new: Scrape | None
    """The latest scrape; None when the worker did not answer (not ready)."""
    old: Scrape | None = None
    """The scrape about ``window`` earlier; None when there is none yet."""


def total(samples: Samples, name: str) -> float:
    """The sum of a sample name over its label sets."""
    return sum(v for _, v in samples.get(name, []))


def _buckets(samples: Samples, name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for labels, value in samples.get(f"{name}_bucket", []):
        le = float(labels["le"])
        out[le] = out.get(le, 0.0) + value
    return out


def _delta(new: float, old: float) -> float:
    # A counter that went down was reset (the worker restarted): count from zero.
    return new - old if new >= old else new


def quantile(views: Iterable[WorkerView], name: str, q: float) -> float | None:
    """The ``q`` quantile (0-1) of histogram ``name`` over the window, all views together."""
    merged: dict[float, float] = {}
    for v in views:
        if v.new is None or v.old is None:
            continue
        new, old = _buckets(v.new.samples, name), _buckets(v.old.samples, name)
        for le, count in new.items():
            merged[le] = merged.get(le, 0.0) + _delta(count, old.get(le, 0.0))
    return signals.histogram_quantile(list(merged.items()), q)


def _rate(views: Iterable[WorkerView], name: str) -> float | None:
    rates = [
        _delta(total(v.new.samples, name), total(v.old.samples, name)) / (v.new.time - v.old.time)
        for v in views
        if v.new is not None and v.old is not None and v.new.time > v.old.time
    ]
    return sum(rates) if rates else None


def router_attainment(router: Samples) -> signals.PoolAttainment:
    """The pool's SLO attainment from its routers' samples, one replica per value of
    the ``instance`` label (none: a single router)."""
    shares: dict[str, dict[str, float]] = {}
    for labels, value in router.get(signals.ROUTER_SLO_ATTAINMENT, []):
        shares.setdefault(labels.get("instance", ""), {})[labels.get("objective", "")] = value
    return signals.attainment(
        [
            signals.RouterAttainment(value, shares.get(labels.get("instance", ""), {}))
            for labels, value in router.get(signals.ROUTER_SLO_REQUESTS, [])
        ]
    )


def snapshot(
    role: roles.Role,
    views: Sequence[WorkerView],
    *,
    now: float,
    warmup: float,
    percentile: float,
    router: Samples | None = None,
) -> signals.Snapshot:
    """A role's :class:`~.signals.Snapshot` from its workers' scrapes (and the router's)."""
    ready = [v for v in views if v.new is not None]
    warm = [v for v in ready if now - v.started >= warmup]
    present = {name for v in ready if v.new is not None for name in v.new.samples}
    q = percentile / 100
    kv = [total(v.new.samples, signals.KV_USAGE) for v in ready if v.new is not None]
    slo = signals.PoolAttainment()
    if router is not None and role == "decode":
        slo = router_attainment(router)
    return signals.Snapshot(
        targets=len(ready),
        warm=len(warm),
        missing=tuple(n for n in signals.required(role) if n not in present),
        engine_waiting=sum(total(v.new.samples, signals.WAITING) for v in warm if v.new),
        router_queued=total(router, signals.ROUTER_QUEUED) if router is not None else 0.0,
        ttft=quantile(warm, signals.TTFT, q),
        tpot=quantile(warm, signals.ITL, q),
        kv_usage=sum(kv) / len(kv) if kv else None,
        request_rate=_rate(ready, signals.SUCCESS),
        prompt_token_rate=_rate(ready, signals.PROMPT_TOKENS),
        where=f"{len(views)} asked, none answered /metrics" if views else "",
        attainment_requests=slo.requests,
        attainment_ttft=slo.ttft,
        attainment_tpot=slo.tpot,
        attainment_both=slo.both,
    )


def role_inputs(
    role: roles.Role,
    views: Sequence[WorkerView],
    *,
    replicas: int,
    now: float,
    warmup: float,
    percentile: float,
    router: Samples | None = None,
) -> planner.RoleInputs:
    """The planner's inputs for one role; ``replicas``: workers wanted (running or
    starting), ready: those that answered."""
    snap = snapshot(role, views, now=now, warmup=warmup, percentile=percentile, router=router)
    return signals.role_inputs(role, snap, replicas=replicas, ready=snap.targets)


def pick_old(history: Sequence[Scrape], now: float, window: float) -> Scrape | None:
    """The scrape to take deltas from: the oldest one within ``window`` of ``now``
    (None when only the latest exists)."""
    within = [s for s in history[:-1] if s.time >= now - window]
    return within[0] if within else (history[-2] if len(history) >= 2 else None)

"""The planner's inputs, read from Prometheus.

A thin adapter between Prometheus (I/O) and :mod:`.signals` (pure). For each
role it runs the PromQL of :func:`queries` (the same table is in
``tandem/autoscaling/AUTOSCALING.md``), which fetches the raw quantities of a
:class:`~.signals.Snapshot`; :func:`.signals.role_inputs` makes them the
planner's inputs, as it does for local mode and the replay. prometheus-api-client's client is
synchronous, so every query runs in a worker thread (``asyncio.to_thread``) and
the queries of a role run concurrently.

Worker metrics are vLLM's own (``vllm:`` names); a worker's pool and role come
from the target labels Prometheus attaches to it (``pool`` and ``role`` by
default: relabel ``tandem.dev/pool`` and ``tandem.dev/role`` pod labels to
them). Latency and queue samples from workers whose target is younger than
``warmup`` are left out (a target is warm when its ``up`` series already
existed ``warmup`` ago): a cold worker's first requests are slow. Load (KV-cache
usage, request and prompt-token rates) is read from every scraped worker: what
a warming worker carries is load all the same, and leaving it out would make a
worker turning warm look like a rise in demand.

The router's admission queue comes from the pool's router targets (matched by
``pool`` and ``namespace``, not ``role``); a pool whose router is not scraped adds
nothing to the decode queue. So does the pool's SLO attainment (decode's reading
carries it): each router replica's share weighed by its requests, the pool's share
of all the requests its routers saw (``min`` would let an idle replica's one slow
request speak for the pool).

Anything that cannot be read is reported as
:class:`~.planner.MetricsUnavailable` with the reason (Prometheus
unreachable, a query refused, no worker scraped, a required metric absent),
never as zeros: the planner then holds the pool's size. An empty window (no
request finished, so no latency quantile) is not an error: the signal is
``None``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tandem import roles
from tandem.autoscaling import planner, signals

__all__ = [
    "QueryError",
    "Source",
    "SourceSettings",
    "prometheus_query",
    "queries",
]

logger = logging.getLogger(__name__)

Query = Callable[[str], list[dict[str, Any]]]
"""A synchronous instant query: PromQL in, Prometheus' ``result`` list out."""

TTFT_BUCKET = f"{signals.TTFT}_bucket"
ITL_BUCKET = f"{signals.ITL}_bucket"


class QueryError(Exception):
    """A query could not be answered (Prometheus unreachable, or it refused it)."""

    cause: planner.Cause
    """``PrometheusUnreachable`` or ``QueryFailed``, chosen where it is raised."""

    def __init__(self, message: str, cause: planner.Cause) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass(frozen=True)
class SourceSettings:
    """Where Prometheus is and how it labels the workers."""

    url: str = "http://127.0.0.1:9090"
    """Base URL of the Prometheus HTTP API."""
    timeout: float = 5.0
    """Seconds each query may take."""
    pool_label: str = "pool"
    """Target label naming a worker's InferencePool."""
    role_label: str = "role"
    """Target label naming a worker's role (``prefill`` or ``decode``)."""
    namespace_label: str = "namespace"
    """Target label naming a worker's namespace; used when a namespace is given."""


def _selector(settings: SourceSettings, pool: str, role: str | None, namespace: str | None) -> str:
    parts = [f'{settings.pool_label}="{pool}"']
    if role is not None:
        parts.append(f'{settings.role_label}="{role}"')
    if namespace is not None:
        parts.append(f'{settings.namespace_label}="{namespace}"')
    return ",".join(parts)


def _seconds(value: float) -> str:
    return f"{max(1, round(value))}s"


def _name_pattern(name: str) -> str:
    """``vllm:x`` as a regex that also matches ``vllm_x``: prometheus_client
    (0.26) escapes the colon of sample names to ``_`` when the scraper negotiates
    OpenMetrics, as Prometheus does, so the same vLLM metric reaches Prometheus
    under either name depending on the client library version."""
    return name.replace(":", "[:_]", 1)


def queries(
    selector: str,
    role: roles.Role,
    percentile: float,
    window: float,
    warmup: float,
    router_selector: str | None = None,
) -> dict[str, str]:
    """The PromQL of every signal of a role (``selector``: its workers' label
    matchers; ``router_selector``: the pool's router targets, for decode's queue)."""
    w, age = _seconds(window), _seconds(warmup)
    warm = f"on(instance) (up{{{selector}}} offset {age})"

    def series(name: str) -> str:
        return f'{{__name__=~"{_name_pattern(name)}",{selector}}}'

    def gauge(agg: str, name: str) -> str:
        return f"{agg}({series(name)} and {warm})"

    def load(agg: str, name: str) -> str:
        return f"{agg}({series(name)})"

    def quantile(bucket: str) -> str:
        rate = f"rate({series(bucket)}[{w}]) and {warm}"
        return f"histogram_quantile({percentile / 100:g}, sum by (le) ({rate}))"

    def rate(name: str) -> str:
        return f"sum(rate({series(name)}[{w}]))"

    out = {
        "targets": f"count(up{{{selector}}} == 1)",
        "warm": f"count(up{{{selector}}} == 1 and {warm})",
        "engine_waiting": gauge("sum", signals.WAITING),
        "request_rate": rate(signals.SUCCESS),
    }
    if role == "prefill":
        out["ttft"] = quantile(TTFT_BUCKET)
        out["prompt_token_rate"] = rate(signals.PROMPT_TOKENS)
    else:
        out["ttft"] = quantile(TTFT_BUCKET)
        out["tpot"] = quantile(ITL_BUCKET)
        out["kv_usage"] = load("avg", signals.KV_USAGE)
        if router_selector is not None:
            out["router_queued"] = f"sum({signals.ROUTER_QUEUED}{{{router_selector}}})"
            requests = f"{signals.ROUTER_SLO_REQUESTS}{{{router_selector}}}"
            out["attainment_requests"] = f"sum({requests})"
            for o in signals.OBJECTIVES:
                share = f'{signals.ROUTER_SLO_ATTAINMENT}{{{router_selector},objective="{o}"}}'
                out[f"attainment_{o}"] = (
                    f"sum({share} * ignoring(objective) {requests}) / sum({requests})"
                )
    for name in signals.required(role):
        out[f"present {name}"] = f"count({series(name)})"
    return out


def prometheus_query(settings: SourceSettings) -> Query:
    """A :data:`Query` over prometheus-api-client (blocking; run it in a thread)."""
    from prometheus_api_client.exceptions import PrometheusApiClientException
    from prometheus_api_client.prometheus_connect import PrometheusConnect
    from requests import RequestException
    from urllib3.util.retry import Retry

    # No retries here: the planner ticks again soon, and a dead Prometheus must
    # be reported quickly, not after a backoff.
    client = PrometheusConnect(
        url=settings.url,
        retry=Retry(total=0),
        timeout=math.ceil(settings.timeout),
        disable_ssl=True,
    )

    def query(promql: str) -> list[dict[str, Any]]:
        try:
            result: list[dict[str, Any]] = client.custom_query(promql)
        except RequestException as exc:
            raise QueryError(
                f"Prometheus unreachable at {settings.url}: {_short(exc)}", "PrometheusUnreachable"
            ) from exc
        except PrometheusApiClientException as exc:
            raise QueryError(f"Prometheus refused a query: {_short(exc)}", "QueryFailed") from exc
        return result

    return query


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _scalar(result: list[dict[str, Any]]) -> float | None:
    """The value of a one-element vector; None when empty or NaN."""
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


class Source:
    """Reads the planner's inputs of a pool from Prometheus."""

    def __init__(self, settings: SourceSettings, query: Query | None = None) -> None:
        self.settings = settings
        self._query = query or prometheus_query(settings)
        self._failing: dict[tuple[str, str], str] = {}
        """Per (pool, role), the query error last logged: logged once, not every tick."""

    async def _run(self, promql: Mapping[str, str]) -> dict[str, list[dict[str, Any]]]:
        keys = list(promql)
        results = await asyncio.gather(*(asyncio.to_thread(self._query, promql[k]) for k in keys))
        return dict(zip(keys, results, strict=True))

    async def read(
        self,
        spec: planner.PlannerSpec,
        pool: str,
        role: roles.Role,
        *,
        window: float,
        warmup: float,
        namespace: str | None = None,
    ) -> signals.Reading:
        """One role's reading; unavailable (with the reason) rather than zeros."""
        selector = _selector(self.settings, pool, role, namespace)
        router = _selector(self.settings, pool, None, namespace)
        promql = queries(selector, role, spec.percentile, window, warmup, router)
        key = (pool if namespace is None else f"{namespace}/{pool}", role)
        try:
            raw = await self._run(promql)
        except QueryError as exc:
            if self._failing.get(key) != str(exc):
                logger.warning("[%s/%s] %s (logged again only if it changes)", *key, exc)
            self._failing[key] = str(exc)
            return signals.Reading(role, None, str(exc), exc.cause)
        if self._failing.pop(key, None) is not None:
            logger.info("[%s/%s] Prometheus answers again", *key)

        def value(name: str) -> float | None:
            return _scalar(raw[name]) if name in raw else None

        requests = value("attainment_requests")
        snapshot = signals.Snapshot(
            targets=int(value("targets") or 0),
            warm=int(value("warm") or 0),
            missing=tuple(n for n in signals.required(role) if not value(f"present {n}")),
            engine_waiting=value("engine_waiting") or 0.0,
            router_queued=value("router_queued") or 0.0,
            ttft=value("ttft"),
            tpot=value("tpot"),
            kv_usage=value("kv_usage"),
            request_rate=value("request_rate"),
            prompt_token_rate=value("prompt_token_rate"),
            where=f"up{{{selector}}}",
            attainment_requests=None if requests is None else round(requests),
            attainment_ttft=value("attainment_ttft"),
            attainment_tpot=value("attainment_tpot"),
            attainment_both=value("attainment_both"),
        )
        return signals.Reading(role, snapshot)

    def forget(self, namespace: str | None, pool: str) -> None:
        """Nothing is kept per pool but the last error logged."""
        key = pool if namespace is None else f"{namespace}/{pool}"
        for role in [r for k, r in self._failing if k == key]:
            self._failing.pop((key, role), None)

    async def read_pool(
        self,
        spec: planner.PlannerSpec,
        pool: str,
        roles: tuple[roles.Role, ...],
        *,
        window: float,
        warmup: float,
        namespace: str | None = None,
    ) -> dict[roles.Role, signals.Reading]:
        """Every role's reading, concurrently."""
        readings = await asyncio.gather(
            *(
                self.read(spec, pool, r, window=window, warmup=warmup, namespace=namespace)
                for r in roles
            )
        )
        return dict(zip(roles, readings, strict=True))

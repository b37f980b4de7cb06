"""Local mode's status line: workers ready per role, queue, TTFT/TPOT at the SLO
percentile, requests served and (when the router counts it) the share of recent
requests that met both objectives, read from the workers' and the router's ``/metrics``."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import httpx

from tandem.autoscaling import scrape, signals
from tandem.local import processes
from tandem.operator import api

__all__ = ["Snapshot", "read", "router_latency"]

ROUTER_REQUESTS = "tandem_router_requests_total"
ROUTER_TTFT = "tandem_router_ttft_seconds"
ROUTER_TPOT = "tandem_router_tpot_seconds"


@dataclass(frozen=True)
class Snapshot:
    """What the status line shows."""

    ready: dict[str, int]
    total: dict[str, int]
    queue: float
    ttft: float | None
    tpot: float | None
    requests: float
    attained: signals.PoolAttainment = field(default_factory=signals.PoolAttainment)
    """The router's SLO attainment over its window (all None: not counted)."""

    def line(self, percentile: float) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else api.format_duration(value)

        roles = " · ".join(f"{r} {self.ready[r]}/{self.total[r]}" for r in self.total)
        p = f"p{percentile:g}"
        text = (
            f"{roles} · queue {self.queue:g} · TTFT {p} {ms(self.ttft)} · "
            f"TPOT {p} {ms(self.tpot)} · requests {self.requests:g}"
        )
        both = self.attained.both
        if self.attained.requests is not None:
            # Rounded down, as the pool's status: 100.0% only when every request met both.
            met = "-" if both is None else f"{math.floor(both * 1000 + 1e-9) / 10:.1f}%"
            text += f" · SLO met {met} of {self.attained.requests:,}"
        return text


def router_latency(samples: scrape.Samples, name: str, q: float) -> float | None:
    """The ``q`` quantile (0-1) of one of the router's histograms since it started."""
    buckets: dict[float, float] = {}
    for labels, value in samples.get(f"{name}_bucket", []):
        le = float(labels["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    return signals.histogram_quantile(list(buckets.items()), q)


async def read(pool: processes.LocalPool, client: httpx.AsyncClient) -> Snapshot:
    """One status reading of a running local pool."""
    q = pool.pool.spec.slo.percentile / 100
    total: dict[str, int] = {role: len(ws) for role, ws in pool.workers.items()}
    ready = dict.fromkeys(total, 0)
    queue = 0.0
    for role, workers in pool.workers.items():
        for worker in workers:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await client.get(worker.url + "/metrics")
                if response.status_code == 200:
                    ready[role] += 1
                    queue += scrape.total(scrape.parse(response.text), signals.WAITING)
    samples: scrape.Samples = {}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        samples = scrape.parse((await client.get(pool.url + "/metrics")).text)
    return Snapshot(
        ready=ready,
        total=total,
        queue=queue,
        ttft=router_latency(samples, ROUTER_TTFT, q),
        tpot=router_latency(samples, ROUTER_TPOT, q),
        requests=scrape.total(samples, ROUTER_REQUESTS),
        attained=scrape.router_attainment(samples),
    )

"""The planner's inputs read straight from a pool's pods: autoscaling with no Prometheus.

The operator's default source. Every tick it asks where the pool's ready workers and
routers are (the caller's ``Endpoints``: the operator reads the EndpointSlices of the
pool's Services), scrapes their ``/metrics`` (concurrently, bounded), keeps two
scrapes per worker (the latest and one about ``window`` earlier) and makes each role's
:class:`~.signals.Snapshot` with :mod:`.scrape`, the same maths as local mode; the
same :func:`.signals.role_inputs` as the Prometheus path then makes the inputs.

A worker counts as warm ``warmup`` after this source first saw it ready (a restarted
operator waits one warm-up before it trusts latency). Prometheus stays the scalable
path (many pools, several operator replicas, one scrape shared with dashboards).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from tandem import roles
from tandem.autoscaling import planner, scrape, signals

__all__ = ["Endpoints", "Source"]

logger = logging.getLogger(__name__)

Component = str
"""``prefill``, ``decode`` or ``router``."""

Endpoints = Callable[[str | None, str, Component], Awaitable[Sequence[str]]]
"""``(namespace, pool, component)`` → base URLs (``http://ip:port``) of its ready pods."""


class Source:
    """Reads a pool's planner inputs from its pods' ``/metrics``."""

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        timeout: float = 2.0,
        concurrency: int = 16,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._clock = clock
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)
        self._gate = asyncio.Semaphore(concurrency)
        self._pools: dict[str, _Memory] = {}
        """Per pool (``namespace/name``): each pod's scrapes and when it was first seen."""

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _scrape(self, url: str) -> scrape.Samples | None:
        async with self._gate:
            try:
                response = await self._http.get(url + "/metrics")
            except httpx.HTTPError:
                return None
        if response.status_code != 200:
            return None
        try:
            return scrape.parse(response.text)
        except ValueError:
            return None

    async def _router(self, namespace: str | None, pool: str) -> scrape.Samples | None:
        urls = await self._endpoints(namespace, pool, "router")
        pages = await asyncio.gather(*(self._scrape(u) for u in urls))
        merged: scrape.Samples = {}
        for url, page in zip(urls, pages, strict=True):
            # As Prometheus would, so that each replica's attainment keeps its weight.
            for name, samples in (page or {}).items():
                merged.setdefault(name, []).extend(
                    ({**labels, "instance": url}, value) for labels, value in samples
                )
        return merged if any(pages) else None

    @staticmethod
    def _views(memory: _Memory, urls: Sequence[str], pages: Sequence[scrape.Samples | None],
               now: float, window: float) -> list[scrape.WorkerView]:  # fmt: skip
        views = []
        for url, samples in zip(urls, pages, strict=True):
            first = memory.first_seen.setdefault(url, now)
            history = memory.history.setdefault(url, collections.deque(maxlen=64))
            if samples is not None:
                history.append(scrape.Scrape(now, samples))
                while len(history) > 2 and history[1].time < now - window:
                    history.popleft()
            new = history[-1] if samples is not None and history else None
            views.append(scrape.WorkerView(first, new, scrape.pick_old(list(history), now, window)))
        return views

    async def read_pool(
        self,
        spec: planner.PlannerSpec,
        pool: str,
        roles_: tuple[roles.Role, ...],
        *,
        window: float,
        warmup: float,
        namespace: str | None = None,
    ) -> dict[roles.Role, signals.Reading]:
        """Every role's reading (see the module docstring)."""
        now = self._clock()
        key = f"{namespace}/{pool}" if namespace else pool
        try:
            router = await self._router(namespace, pool)
            listed = [await self._endpoints(namespace, pool, role) for role in roles_]
        except Exception as exc:  # the caller's lister: the API server, in the operator
            logger.warning("[%s] cannot list the pool's pods: %s", key, exc)
            why = f"cannot list the pool's pods: {exc}"
            return {r: signals.Reading(r, None, why, "NoTargets") for r in roles_}
        memory = self._pools.setdefault(key, _Memory())
        out: dict[roles.Role, signals.Reading] = {}
        seen: set[str] = set()
        for role, urls in zip(roles_, listed, strict=True):
            pages = await asyncio.gather(*(self._scrape(u) for u in urls))
            views = self._views(memory, urls, pages, now, window)
            seen.update(urls)
            snapshot = scrape.snapshot(
                role, views, now=now, warmup=warmup, percentile=spec.percentile, router=router
            )
            out[role] = signals.Reading(role, snapshot)
        # Pods that left are forgotten (a pod IP may come back as another pod).
        for url in [u for u in memory.history if u not in seen]:
            memory.history.pop(url, None)
            memory.first_seen.pop(url, None)
        return out

    def forget(self, namespace: str | None, pool: str) -> None:
        """Drop what is kept of a pool (it was deleted)."""
        self._pools.pop(f"{namespace}/{pool}" if namespace else pool, None)


@dataclass
class _Memory:
    history: dict[str, collections.deque[scrape.Scrape]] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)

"""``tandem up --autoscale``: the operator's planner, on local worker processes.

Every tick scrapes each worker's ``/metrics`` (and the router's) and
:mod:`tandem.autoscaling.scrape` turns two scrapes per worker (the latest, and the
one about ``window`` ago) into the planner's inputs through the same signals
function as the operator's Prometheus path. The same
:func:`~tandem.autoscaling.planner.decide` then sizes each role, and
:class:`LocalAutoscaler` starts or stops worker processes to match: a new worker
joins the router once it is healthy; a removed one leaves the router *before* it is
drained and stopped. Each decision that changes a size is printed, with its reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx

from tandem import roles
from tandem.autoscaling import planner, scrape, signals
from tandem.local import planning, processes
from tandem.operator import api
from tandem.workers import launcher

__all__ = ["LocalAutoscaler"]

logger = logging.getLogger(__name__)

Spawn = Callable[[roles.Role, int], processes.Worker]
"""Builds (does not start) the ``index``-th worker of a role."""


@dataclass
class _Tracked:
    worker: processes.Worker
    started: float
    history: collections.deque[scrape.Scrape] = field(
        default_factory=lambda: collections.deque(maxlen=64)
    )
    healthy: bool = False


class LocalAutoscaler:
    """Sizes a local pool's roles with the planner (see the module docstring)."""

    def __init__(
        self,
        pool: processes.LocalPool,
        spawn: Spawn,
        out: Callable[[str], None] = print,
        *,
        clock: Callable[[], float] = time.monotonic,
        startup_timeout_s: float = 600.0,
        drain_timeout_s: float = 30.0,
        tunables: Mapping[str, float | None] | None = None,
    ) -> None:
        self.pool = pool
        self._spawn = spawn
        self._out = out
        self._clock = clock
        self._startup_timeout_s = startup_timeout_s
        self._drain_timeout_s = drain_timeout_s
        spec = pool.pool.spec
        self.spec = planner.PlannerSpec.from_api(spec, **(tunables or {}))
        self.interval = api.parse_duration(spec.autoscaling.interval)
        self.window = api.parse_duration(spec.autoscaling.window)
        self.warmup = api.parse_duration(spec.autoscaling.warmup)
        self.state = planner.PlannerState()
        now = clock()
        self._tracked: dict[int, _Tracked] = {
            id(w): _Tracked(w, now) for ws in pool.workers.values() for w in ws
        }
        self._starting: dict[str, set[asyncio.Task[None]]] = collections.defaultdict(set)
        self._started: list[processes.Worker] = []
        self._next_index = {r: len(ws) for r, ws in pool.workers.items()}
        self._tasks: set[asyncio.Task[None]] = set()
        self._unavailable: dict[str, str] = {}

    # -- observing --------------------------------------------------------

    async def _scrape(self, http: httpx.AsyncClient, url: str) -> scrape.Samples | None:
        try:
            response = await http.get(url + "/metrics")
            if response.status_code != 200:
                return None
            return scrape.parse(response.text)
        except (httpx.HTTPError, ValueError):
            return None

    async def observe(self, http: httpx.AsyncClient) -> planner.Inputs:
        now = self._clock()
        workers = [w for ws in self.pool.workers.values() for w in ws]
        scraped = await asyncio.gather(*(self._scrape(http, w.url) for w in workers))
        router = await self._scrape(http, self.pool.url)
        for w, samples in zip(workers, scraped, strict=True):
            t = self._tracked.setdefault(id(w), _Tracked(w, now))
            t.healthy = samples is not None
            if samples is not None:
                t.history.append(scrape.Scrape(now, samples))
                while len(t.history) > 2 and t.history[1].time < now - self.window:
                    t.history.popleft()
        inputs: dict[str, planner.RoleInputs] = {}
        for role, ws in self.pool.workers.items():
            views = []
            for w in ws:
                t = self._tracked[id(w)]
                new = t.history[-1] if t.healthy and t.history else None
                views.append(
                    scrape.WorkerView(
                        t.started, new, scrape.pick_old(list(t.history), now, self.window)
                    )
                )
            inputs[role] = scrape.role_inputs(
                role,
                views,
                replicas=len(ws) + len(self._starting[role]),
                now=now,
                warmup=self.warmup,
                percentile=self.spec.percentile,
                router=router,
            )
        return planner.Inputs(decode=inputs["decode"], prefill=inputs.get("prefill"))

    # -- acting ------------------------------------------------------------

    def _urls(self, role: roles.Role) -> list[str]:
        return [w.url for w in self.pool.workers[role]]

    async def _add(self, role: roles.Role) -> None:
        index = self._next_index[role]
        self._next_index[role] += 1
        worker = self._spawn(role, index)
        self._started.append(worker)
        worker.start()
        try:
            await worker.wait_ready(self._startup_timeout_s)
        except (planning.LocalModeError, launcher.WorkerError) as exc:
            self._out(f"autoscale: a new {role} worker failed to start: {exc}")
            await worker.stop()
            return
        self._tracked[id(worker)] = _Tracked(worker, self._clock())
        self.pool.workers[role].append(worker)
        self.pool.set_endpoints(role, self._urls(role))

    async def _remove(self, role: roles.Role) -> None:
        worker = self.pool.workers[role].pop()  # the newest goes first
        self.pool.set_endpoints(role, self._urls(role))  # no new requests reach it ...
        await self._drain(worker)  # ... and those it holds may finish
        await worker.stop()
        self._tracked.pop(id(worker), None)

    async def _drain(self, worker: processes.Worker) -> None:
        deadline = self._clock() + self._drain_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while self._clock() < deadline:
                samples = await self._scrape(http, worker.url)
                if (
                    samples is None
                    or scrape.total(samples, signals.RUNNING)
                    + scrape.total(samples, signals.WAITING)
                    == 0
                ):
                    return
                await asyncio.sleep(0.5)

    def _launch(self, role: roles.Role) -> None:
        task = asyncio.create_task(self._add(role), name=f"autoscale-add-{role}")
        self._starting[role].add(task)
        self._tasks.add(task)
        task.add_done_callback(self._starting[role].discard)
        task.add_done_callback(self._tasks.discard)

    async def apply(self, plan: planner.Plan) -> None:
        removals = []
        for d in plan.decisions:
            role: roles.Role = d.role
            if d.replicas is None or not d.changed:
                continue
            self._out(f"autoscale: {d.reason}")
            for _ in range(d.replicas - d.current):
                self._launch(role)
            removals += [self._remove(role) for _ in range(d.current - d.replicas)]
        if removals:
            await asyncio.gather(*removals)

    def _report_metrics(self, plan: planner.Plan) -> None:
        for d in plan.decisions:
            if not d.metrics_available:
                if self._unavailable.get(d.role) != d.reason:
                    self._out(f"autoscale: {d.reason}")
                self._unavailable[d.role] = d.reason
            else:
                self._unavailable.pop(d.role, None)

    async def tick(self, http: httpx.AsyncClient) -> planner.Plan:
        inputs = await self.observe(http)
        plan = planner.decide(self.spec, inputs, self.state, self._clock())
        self.state = plan.state
        self._report_metrics(plan)
        await self.apply(plan)
        return plan

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval`` until ``stop`` is set; then stop what it started."""
        try:
            async with httpx.AsyncClient(timeout=2.0) as http:
                while not stop.is_set():
                    started = self._clock()
                    await self.tick(http)
                    wait = max(0.0, self.interval - (self._clock() - started))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=wait)
        finally:
            await self.close()

    async def close(self) -> None:
        """Cancel starts in progress and stop every worker this autoscaler started."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self._started), return_exceptions=True)

"""``tandem up --autoscale``: the operator's planner, on local worker processes.

The signals come straight from the workers' ``/metrics`` (and the router's), not
from Prometheus: every tick scrapes each worker, and :func:`role_inputs` turns
two scrapes per worker (the latest, and the one about ``window`` ago) into the
planner's :class:`~tandem.operator.autoscaling.RoleInputs`, as the PromQL of
``operator/AUTOSCALING.md`` would: histogram bucket deltas → the SLO percentile,
counter deltas → rates, gauges → queue depth and mean KV usage, from warm
workers only (started more than ``warmup`` ago). The same
:func:`~tandem.operator.autoscaling.decide` then sizes each role, and
:class:`LocalAutoscaler` starts or stops worker processes to match: a new worker
joins the router once it is healthy; a removed one leaves the router *before*
it is drained and stopped. Each decision that changes a size is printed, with
its reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from tandem import local
from tandem.operator import api, autoscaling

__all__ = [
    "LocalAutoscaler",
    "Scrape",
    "WorkerView",
    "role_inputs",
]

logger = logging.getLogger(__name__)

Samples = dict[str, list[tuple[dict[str, str], float]]]

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
SUCCESS = "vllm:request_success_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
ROUTER_QUEUED = "tandem_router_queued_requests"


def normalize(samples: Samples) -> Samples:
    """``vllm_x`` → ``vllm:x``: some client library versions escape the colon."""
    return {("vllm:" + k[5:] if k.startswith("vllm_") else k): v for k, v in samples.items()}


# ---------------------------------------------------------------------------
# Pure: scrapes → the planner's inputs


@dataclass(frozen=True)
class Scrape:
    """One read of a worker's ``/metrics``."""

    time: float
    samples: Samples


@dataclass(frozen=True)
class WorkerView:
    """What the planner's inputs are computed from, for one worker."""

    started: float
    """When the process was started (warm-up counts from here)."""
    new: Scrape | None
    """The latest scrape; None when the worker did not answer (not ready)."""
    old: Scrape | None = None
    """The scrape about ``window`` earlier; None when there is none yet."""


def _total(samples: Samples, name: str) -> float:
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


def _quantile(views: Iterable[WorkerView], name: str, q: float) -> float | None:
    total: dict[float, float] = {}
    for v in views:
        if v.new is None or v.old is None:
            continue
        new, old = _buckets(v.new.samples, name), _buckets(v.old.samples, name)
        for le, count in new.items():
            total[le] = total.get(le, 0.0) + _delta(count, old.get(le, 0.0))
    return local.histogram_quantile(list(total.items()), q)


def _rate(views: Iterable[WorkerView], name: str) -> float | None:
    rates = [
        _delta(_total(v.new.samples, name), _total(v.old.samples, name)) / (v.new.time - v.old.time)
        for v in views
        if v.new is not None and v.old is not None and v.new.time > v.old.time
    ]
    return sum(rates) if rates else None


def required(role: autoscaling.Role) -> tuple[str, ...]:
    """Metrics whose absence makes a role's signals unavailable (as in metrics_source)."""
    if role == "prefill":
        return (WAITING, f"{TTFT}_bucket")
    return (WAITING, f"{ITL}_bucket", KV_USAGE)


def role_inputs(
    role: autoscaling.Role,
    views: Sequence[WorkerView],
    *,
    replicas: int,
    now: float,
    warmup: float,
    percentile: float,
    router: Samples | None = None,
) -> autoscaling.RoleInputs:
    """The planner's inputs for one role, from its workers' scrapes.

    ``replicas``: workers wanted (running or starting); ready: those that answered;
    warming: ready ones started less than ``warmup`` ago, whose samples are left out.
    The router's queue (requests waiting for a decode worker) counts for decode.
    """
    ready = [v for v in views if v.new is not None]
    warm = [v for v in ready if now - v.started >= warmup]
    metrics: autoscaling.RoleMetrics | autoscaling.MetricsUnavailable
    if not ready:
        metrics = autoscaling.MetricsUnavailable(f"no {role} worker answered /metrics")
    else:
        missing = [n for n in required(role) if not any(n in v.new.samples for v in ready if v.new)]
        if missing:
            metrics = autoscaling.MetricsUnavailable(
                f"{', '.join(missing)} not exposed by the {role} workers"
            )
        else:
            q = percentile / 100
            queue = sum(_total(v.new.samples, WAITING) for v in warm if v.new)
            if role == "decode" and router is not None:
                queue += _total(router, ROUTER_QUEUED)
            kv = [_total(v.new.samples, KV_USAGE) for v in warm if v.new]
            metrics = autoscaling.RoleMetrics(
                queue_depth=queue,
                ttft=_quantile(warm, TTFT, q),
                tpot=_quantile(warm, ITL, q) if role == "decode" else None,
                kv_usage=sum(kv) / len(kv) if role == "decode" and kv else None,
                request_rate=_rate(warm, SUCCESS),
                prompt_token_rate=_rate(warm, PROMPT_TOKENS) if role == "prefill" else None,
            )
    return autoscaling.RoleInputs(
        replicas=replicas, ready=len(ready), warming=len(ready) - len(warm), metrics=metrics
    )


def pick_old(history: Sequence[Scrape], now: float, window: float) -> Scrape | None:
    """The scrape to take deltas from: the oldest one within ``window`` of ``now``
    (None when only the latest exists)."""
    within = [s for s in history[:-1] if s.time >= now - window]
    return within[0] if within else (history[-2] if len(history) >= 2 else None)


# ---------------------------------------------------------------------------
# I/O: the local autoscaler

Spawn = Callable[[local.WorkerRole, int], local.Worker]
"""Builds (does not start) the ``index``-th worker of a role."""


@dataclass
class _Tracked:
    worker: local.Worker
    started: float
    history: collections.deque[Scrape] = field(default_factory=lambda: collections.deque(maxlen=64))
    healthy: bool = False


class LocalAutoscaler:
    """Sizes a local pool's roles with the planner (see the module docstring)."""

    def __init__(
        self,
        pool: local.LocalPool,
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
        self.spec = autoscaling.PlannerSpec.from_api(spec, **(tunables or {}))
        self.interval = api.parse_duration(spec.autoscaling.interval)
        self.window = api.parse_duration(spec.autoscaling.window)
        self.warmup = api.parse_duration(spec.autoscaling.warmup)
        self.state = autoscaling.PlannerState()
        now = clock()
        self._tracked: dict[int, _Tracked] = {
            id(w): _Tracked(w, now) for ws in pool.workers.values() for w in ws
        }
        self._starting: dict[str, set[asyncio.Task[None]]] = collections.defaultdict(set)
        self._started: list[local.Worker] = []
        self._next_index = {r: len(ws) for r, ws in pool.workers.items()}
        self._tasks: set[asyncio.Task[None]] = set()
        self._unavailable: dict[str, str] = {}

    # -- observing --------------------------------------------------------

    async def _scrape(self, http: httpx.AsyncClient, url: str) -> Samples | None:
        try:
            response = await http.get(url + "/metrics")
            if response.status_code != 200:
                return None
            return normalize(local.parse_samples(response.text))
        except (httpx.HTTPError, ValueError):
            return None

    async def observe(self, http: httpx.AsyncClient) -> autoscaling.Inputs:
        now = self._clock()
        workers = [w for ws in self.pool.workers.values() for w in ws]
        scraped = await asyncio.gather(*(self._scrape(http, w.url) for w in workers))
        router = await self._scrape(http, self.pool.url)
        for w, samples in zip(workers, scraped, strict=True):
            t = self._tracked.setdefault(id(w), _Tracked(w, now))
            t.healthy = samples is not None
            if samples is not None:
                t.history.append(Scrape(now, samples))
                while len(t.history) > 2 and t.history[1].time < now - self.window:
                    t.history.popleft()
        inputs: dict[str, autoscaling.RoleInputs] = {}
        for role, ws in self.pool.workers.items():
            views = []
            for w in ws:
                t = self._tracked[id(w)]
                new = t.history[-1] if t.healthy and t.history else None
                views.append(
                    WorkerView(t.started, new, pick_old(list(t.history), now, self.window))
                )
            inputs[role] = role_inputs(
                role,  # type: ignore[arg-type]
                views,
                replicas=len(ws) + len(self._starting[role]),
                now=now,
                warmup=self.warmup,
                percentile=self.spec.percentile,
                router=router,
            )
        return autoscaling.Inputs(decode=inputs["decode"], prefill=inputs.get("prefill"))

    # -- acting ------------------------------------------------------------

    def _urls(self, role: str) -> list[str]:
        return [w.url for w in self.pool.workers[role]]

    async def _add(self, role: local.WorkerRole) -> None:
        index = self._next_index[role]
        self._next_index[role] += 1
        worker = self._spawn(role, index)
        self._started.append(worker)
        worker.start()
        try:
            await worker.wait_ready(self._startup_timeout_s)
        except local.LocalModeError as exc:
            self._out(f"autoscale: a new {role} worker failed to start: {exc}")
            await worker.stop()
            return
        self._tracked[id(worker)] = _Tracked(worker, self._clock())
        self.pool.workers[role].append(worker)
        self.pool.set_endpoints(role, self._urls(role))

    async def _remove(self, role: local.WorkerRole) -> None:
        worker = self.pool.workers[role].pop()  # the newest goes first
        self.pool.set_endpoints(role, self._urls(role))  # no new requests reach it ...
        await self._drain(worker)  # ... and those it holds may finish
        await worker.stop()
        self._tracked.pop(id(worker), None)

    async def _drain(self, worker: local.Worker) -> None:
        deadline = self._clock() + self._drain_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while self._clock() < deadline:
                samples = await self._scrape(http, worker.url)
                if samples is None or _total(samples, RUNNING) + _total(samples, WAITING) == 0:
                    return
                await asyncio.sleep(0.5)

    def _launch(self, role: local.WorkerRole) -> None:
        task = asyncio.create_task(self._add(role), name=f"autoscale-add-{role}")
        self._starting[role].add(task)
        self._tasks.add(task)
        task.add_done_callback(self._starting[role].discard)
        task.add_done_callback(self._tasks.discard)

    async def apply(self, plan: autoscaling.Plan) -> None:
        removals = []
        for d in plan.decisions:
            role: local.WorkerRole = d.role
            if d.replicas is None or not d.changed:
                continue
            self._out(f"autoscale: {d.reason}")
            for _ in range(d.replicas - d.current):
                self._launch(role)
            removals += [self._remove(role) for _ in range(d.current - d.replicas)]
        if removals:
            await asyncio.gather(*removals)

    def _report_metrics(self, plan: autoscaling.Plan) -> None:
        for d in plan.decisions:
            if not d.metrics_available:
                if self._unavailable.get(d.role) != d.reason:
                    self._out(f"autoscale: {d.reason}")
                self._unavailable[d.role] = d.reason
            else:
                self._unavailable.pop(d.role, None)

    async def tick(self, http: httpx.AsyncClient) -> autoscaling.Plan:
        inputs = await self.observe(http)
        plan = autoscaling.decide(self.spec, inputs, self.state, self._clock())
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

"""Replay a workload through simulated pools: how would a scaling strategy have done?

Pure and deterministic: no I/O, no wall clock, seeded randomness. Time is
virtual and advances event by event, so an hour of traffic replays in seconds.
``benchmarks/replay.py`` is the command-line shell (tables and plots).

What is simulated:

* **Workers** price every engine step with the emulator's roofline
  (:mod:`tandem.workers.emulator.timing`): a prefill step of ``chunk`` tokens over
  ``context`` cached ones costs :func:`~.timing.step_flops` /
  :func:`~.timing.step_bytes` of those tokens; a decode step of ``n`` sequences
  holding ``C`` tokens of KV costs ``max(flops, bytes)`` with the same
  coefficients (derived from ``timing`` once, and checked against
  :func:`~.timing.step_time` in the tests). Continuous batching as vLLM v1 does
  it: a token budget per step (chunked prefill), ``max_num_seqs``, a KV capacity
  (:func:`~.timing.kv_capacity_tokens`); a request is admitted when the KV of its
  whole prompt and output fits (no preemption).
* **Disaggregated** pools: the router sends a request to the prefill worker with
  the least prompt work queued; when its prefill ends, to the decode worker with
  the most free KV; the KV crosses a link (:func:`~.timing.kv_transfer_time`, one
  transfer at a time per decode worker) and the decode worker emits every output
  token (its first step gives the first token, as vLLM's NixlConnector does).
* **Colocated** (aggregated) workers run both: each step carries every running
  decode plus a prefill chunk, so a long prefill stretches the step every
  running sequence waits for (the interference disaggregation removes).
* Between events a decode worker runs *segments* of identical steps (the batch
  only changes when a sequence joins or finishes), so the cost of a replay grows
  with requests, not with tokens.

Strategies (:mod:`.strategies`): static pools, colocated pools, an HPA-style
autoscaler on GPU busy time, a schedule, and Tandem (the planner of
:mod:`tandem.autoscaling.planner`, fed every ``interval`` with a
:class:`~tandem.autoscaling.signals.Snapshot` of the simulated workers made inputs by
:func:`tandem.autoscaling.signals.role_inputs`, as the operator's are). Workers a strategy adds cost GPU-seconds from the moment they are asked
for and serve after ``provisioning_delay``; removed workers drain first.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem import roles
from tandem.autoscaling import planner as autoscaling
from tandem.autoscaling import signals
from tandem.replay import results, settings, strategies, workloads

__all__ = ["replay"]

WorkerKind = roles.WorkerKind


@dataclass(eq=False)
class _Req:
    request: workloads.Request
    id: int
    prefilled: int = 0
    arrived_worker: float = 0.0
    first_token: float | None = None
    target: int = 0
    """Decode: the worker's step counter at which the last token is out."""
    base: int = 0
    """Decode: tokens held at join minus the worker's counter then."""


@dataclass(eq=False)
class _Worker:
    id: int
    kind: WorkerKind
    created: float
    ready_at: float
    draining: bool = False
    removed_at: float | None = None
    # prefill side (prefill, mixed)
    queue: deque[_Req] = field(default_factory=deque)
    queued_tokens: int = 0
    step_start: float = 0.0
    step_end: float | None = None
    step_chunks: list[tuple[_Req, int]] = field(default_factory=list)
    # decode side (decode, mixed)
    waiting: deque[_Req] = field(default_factory=deque)
    """Decode: requests whose prefill is done, waiting for KV room."""
    waiting_tokens: int = 0
    """Prompt tokens of ``waiting`` (kept, not summed: an overloaded pool's line is long)."""
    transferring: int = 0
    link_free: float = 0.0
    arrived: list[_Req] = field(default_factory=list)
    """Decode: KV arrived, joining at the next step boundary."""
    pending_kv: int = 0
    """KV tokens allocated to prompts admitted but not decoding yet."""
    running: list[tuple[int, int, _Req]] = field(default_factory=list)
    """Heap of (target counter, id, request)."""
    counter: int = 0
    """Decode steps run so far."""
    context_base: int = 0
    segment: tuple[float, float] | None = None
    """(start, seconds per step) of the run of decode steps under way."""
    version: int = 0
    busy: list[tuple[float, float]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.running)

    def steps_done(self, now: float) -> int:
        if self.segment is None:
            return 0
        start, dt = self.segment
        return int((now - start) / dt + 1e-9)

    def kv_tokens(self, now: float) -> int:
        """KV tokens held now: running sequences (prompt and output so far) plus
        arriving transfers are not counted until they land."""
        return self.context_base + self.n * (self.counter + self.steps_done(now))

    def ready(self, now: float) -> bool:
        return now >= self.ready_at and not self.draining and self.removed_at is None

    def idle(self) -> bool:
        return not (
            self.queue or self.waiting or self.running or self.transferring or self.arrived
            or self.step_end is not None
        )  # fmt: skip

    def mark_busy(self, start: float, end: float) -> None:
        if end <= start:
            return
        if self.busy and self.busy[-1][1] >= start - 1e-12:
            self.busy[-1] = (self.busy[-1][0], end)
        else:
            self.busy.append((start, end))

    def busy_in(self, start: float, end: float) -> float:
        """Seconds of [start, end] the GPU ran a step (DCGM's GPU_UTIL, roughly)."""
        spans = list(self.busy)
        if self.segment is not None:
            spans.append((self.segment[0], end))
        total = 0.0
        for s, e in reversed(spans):
            if e <= start:
                break
            total += max(0.0, min(e, end) - max(s, start))
        return min(total, end - start)


class _Samples:
    """Samples of one signal, (time, worker, value, weight), in time order."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.rows: list[tuple[int, float, float]] = []

    def add(self, t: float, worker: int, value: float, weight: float = 1.0) -> None:
        self.times.append(t)
        self.rows.append((worker, value, weight))

    def window(self, start: float, end: float, workers: set[int]) -> list[tuple[float, float]]:
        lo = bisect.bisect_left(self.times, start)
        hi = bisect.bisect_right(self.times, end)
        return [(v, w) for wid, v, w in self.rows[lo:hi] if wid in workers]


def _weighted_quantile(samples: list[tuple[float, float]], q: float) -> float | None:
    if not samples:
        return None
    samples.sort()
    goal = q / 100 * sum(w for _, w in samples)
    acc = 0.0
    for value, weight in samples:
        acc += weight
        if acc >= goal - 1e-12:
            return value
    return samples[-1][0]


class _Sim:
    def __init__(
        self,
        workload: workloads.Workload,
        strategy: strategies.Strategy,
        config: settings.ReplayConfig,
    ) -> None:
        self.workload = workload
        self.strategy = strategy
        self.config = config
        self.engine = config.engine
        self.costs = config.engine.costs()
        self.capacity = config.engine.kv_capacity
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()
        self.workers: list[_Worker] = []
        self.router: dict[WorkerKind, deque[_Req]] = {
            "prefill": deque(), "decode": deque(), "aggregated": deque()
        }  # fmt: skip
        self.outcomes: list[results.RequestOutcome] = []
        self.decisions: list[results.Decision] = []
        self.worker_ttft = _Samples()
        self.itl = _Samples()
        self.prompt_done = _Samples()
        self.finished = _Samples()
        self.controller = strategy.controller()

    # -- plumbing --------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (t, next(self.order), action))

    def at_boundary(self, t: float, w: _Worker) -> None:
        """Kick ``w`` at ``t`` unless its segment was replaced by then."""
        version = w.version

        def fire() -> None:
            if w.version == version:
                self.kick(w)

        self.at(t, fire)

    def pool(self, kind: WorkerKind) -> list[_Worker]:
        """Workers asked for and not being removed."""
        return [
            w for w in self.workers if w.kind == kind and not w.draining and w.removed_at is None
        ]

    def add_worker(self, kind: WorkerKind, delay: float) -> None:
        w = _Worker(len(self.workers), kind, self.now, self.now + delay)
        self.workers.append(w)
        self.at(w.ready_at, functools.partial(self.on_ready, w))

    def remove_worker(self, kind: WorkerKind) -> None:
        pool = self.pool(kind)
        if not pool:
            return
        # Cancel one still starting first, else drain the least loaded.
        starting = [w for w in pool if w.ready_at > self.now]
        victim = max(starting, key=lambda w: w.ready_at) if starting else min(pool, key=self.load)
        victim.draining = True
        if victim.ready_at > self.now or victim.idle():
            victim.removed_at = self.now

    def load(self, w: _Worker) -> float:
        return w.queued_tokens + w.kv_tokens(self.now) + w.pending_kv + w.waiting_tokens

    # -- routing ---------------------------------------------------------------

    def dispatch(self, kind: WorkerKind, req: _Req) -> None:
        ready = [w for w in self.workers if w.kind == kind and w.ready(self.now)]
        if not ready:
            self.router[kind].append(req)
            return
        w = min(ready, key=self.load)
        if kind == "decode":
            w.waiting.append(req)
            w.waiting_tokens += req.request.prompt_tokens
            self.admit(w)
            return
        req.arrived_worker = self.now
        w.queue.append(req)
        w.queued_tokens += req.request.prompt_tokens - req.prefilled
        self.interrupt(w)

    # -- a worker's engine -----------------------------------------------------

    def fits(self, w: _Worker, req: _Req, seqs: int) -> bool:
        # As vLLM: room for the prompt's blocks now; the output's grow later (no
        # preemption is modelled: a full cache slows admission, not running work).
        held = w.kv_tokens(self.now) + w.pending_kv + req.request.prompt_tokens
        return held <= self.capacity and seqs < self.engine.max_num_seqs

    def admit(self, w: _Worker) -> None:
        """Decode worker: reserve KV and start the transfer of each waiting request that fits."""
        while w.waiting and self.fits(w, w.waiting[0], w.n + w.transferring + len(w.arrived)):
            req = w.waiting.popleft()
            w.waiting_tokens -= req.request.prompt_tokens
            w.pending_kv += req.request.prompt_tokens
            w.transferring += 1
            start = max(self.now, w.link_free)
            w.link_free = start + self.costs.transfer(req.request.prompt_tokens)
            self.at(w.link_free, functools.partial(self.on_transferred, w, req))

    def interrupt(self, w: _Worker) -> None:
        """Something changed for ``w``: act at its next step boundary."""
        if w.step_end is not None:
            return  # the step's end will look
        if w.segment is None:
            self.kick(w)
            return
        start, dt = w.segment
        boundary = start + math.ceil((self.now - start) / dt - 1e-9) * dt
        if boundary <= self.now + 1e-12:
            self.kick(w)
        else:
            self.at_boundary(boundary, w)

    def settle(self, w: _Worker) -> None:
        """Account for the decode steps of the segment that ended by now."""
        if w.segment is None:
            return
        steps = w.steps_done(self.now)
        if steps > 0:
            self.itl.add(self.now, w.id, w.segment[1], steps * w.n)
            w.counter += steps
        w.mark_busy(w.segment[0], self.now)
        w.segment = None
        w.version += 1

    def join(self, w: _Worker, req: _Req, emitted: int) -> None:
        """A sequence starts decoding on ``w`` with ``emitted`` tokens already out."""
        w.pending_kv -= req.request.prompt_tokens
        remaining = req.request.output_tokens - emitted
        if remaining <= 0:
            self.finish(w, req)
            return
        req.base = req.request.prompt_tokens + emitted - w.counter
        req.target = w.counter + remaining
        w.context_base += req.base
        heapq.heappush(w.running, (req.target, req.id, req))

    def finish(self, w: _Worker, req: _Req) -> None:
        r = req.request
        first = req.first_token if req.first_token is not None else self.now
        tpot = (self.now - first) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        self.outcomes.append(results.RequestOutcome(r, first - r.arrival, tpot, self.now))
        self.finished.add(self.now, w.id, 1.0)

    def reap(self, w: _Worker) -> None:
        while w.running and w.running[0][0] <= w.counter:
            _, _, req = heapq.heappop(w.running)
            w.context_base -= req.base
            self.finish(w, req)

    def decode_step(self, w: _Worker) -> float:
        return self.costs.step(w.n, w.context_base + w.n * w.counter)

    def kick(self, w: _Worker) -> None:
        """At a step boundary: account, then start the next step or run of steps."""
        if w.step_end is not None:
            return
        self.settle(w)
        self.reap(w)
        joined = w.arrived
        w.arrived = []
        for req in joined:
            self.join(w, req, emitted=0)
        if w.kind == "decode":
            self.admit(w)
        started = bool(w.queue) and self.start_step(w)
        if not started and w.running:
            dt = self.decode_step(w)
            w.segment = (self.now, dt)
            w.version += 1
            self.at_boundary(self.now + max(1, w.running[0][0] - w.counter) * dt, w)
        for req in joined:
            req.first_token = self.now + (
                w.step_end - self.now if w.step_end else self.decode_step(w)
            )
        if w.draining and w.idle() and w.removed_at is None:
            w.removed_at = self.now

    def start_step(self, w: _Worker) -> bool:
        """A step with prefill chunks (plus every running decode on a mixed worker)."""
        budget = self.engine.max_num_batched_tokens - w.n
        chunks: list[tuple[_Req, int]] = []
        seqs = w.n
        for req in w.queue:
            if budget <= 0:
                break
            if w.kind == "aggregated" and req.prefilled == 0:
                if not self.fits(w, req, seqs):
                    break
                w.pending_kv += req.request.prompt_tokens
            chunk = min(budget, req.request.prompt_tokens - req.prefilled)
            chunks.append((req, chunk))
            budget -= chunk
            seqs += 1
        if not chunks:
            return False
        dt = self.costs.step(
            w.n, w.context_base + w.n * w.counter, [(c, r.prefilled) for r, c in chunks]
        )
        w.step_chunks = chunks
        w.step_start = self.now
        w.step_end = self.now + dt
        w.mark_busy(self.now, w.step_end)
        self.at(w.step_end, functools.partial(self.end_step, w))
        return True

    def end_step(self, w: _Worker) -> None:
        w.step_end = None
        if w.running:  # a mixed step also gave every running sequence a token
            self.itl.add(self.now, w.id, self.now - w.step_start, w.n)
            w.counter += 1
            self.reap(w)
        for req, chunk in w.step_chunks:
            req.prefilled += chunk
            w.queued_tokens -= chunk
            if req.prefilled < req.request.prompt_tokens:
                continue
            w.queue.remove(req)
            self.prompt_done.add(self.now, w.id, req.request.prompt_tokens)
            self.worker_ttft.add(self.now, w.id, self.now - req.arrived_worker)
            if w.kind == "prefill":
                self.dispatch("decode", req)
            else:
                req.first_token = self.now
                self.join(w, req, emitted=1)
        w.step_chunks = []
        self.kick(w)

    # -- events ----------------------------------------------------------------

    def on_arrival(self, req: _Req) -> None:
        self.dispatch(self.strategy.arrivals, req)

    def on_transferred(self, w: _Worker, req: _Req) -> None:
        w.transferring -= 1
        w.arrived.append(req)
        self.interrupt(w)

    def on_ready(self, w: _Worker) -> None:
        queued = self.router[w.kind]
        while queued and w.ready(self.now):
            self.dispatch(w.kind, queued.popleft())

    def run(self) -> results.Result:
        cfg = self.config
        for kind, count in self.strategy.sizes().items():
            for _ in range(count):
                self.workers.append(_Worker(len(self.workers), kind, 0.0, -cfg.warmup))
        for i, r in enumerate(self.workload.requests):
            self.at(r.arrival, functools.partial(self.on_arrival, _Req(r, i)))
        self.controller.start(self)
        ticks = int(self.workload.duration // cfg.interval)
        for k in range(1, ticks + 1):
            self.at(k * cfg.interval, functools.partial(self.controller.tick, self))
        budget = 100 * len(self.workload.requests) + 100_000
        while self.events:
            budget -= 1
            if budget < 0:
                raise RuntimeError("replay did not converge (event budget spent)")
            self.now, _, action = heapq.heappop(self.events)
            action()
        return self.result()

    def result(self) -> results.Result:
        s, cfg, end = self.strategy, self.config, self.workload.duration
        gpu_seconds = 0.0
        for w in self.workers:
            stop = end if w.removed_at is None else min(end, w.removed_at)
            gpu_seconds += max(0.0, stop - max(0.0, w.created)) * s.gpus_per_worker(w.kind)
        outcomes = sorted(self.outcomes, key=lambda o: o.request.arrival)
        firsts = sorted((o.request.arrival + o.ttft, o.ttft) for o in outcomes)
        lasts = sorted((o.finish, o.tpot) for o in outcomes)
        step = cfg.timeline_step

        def recent(values: list[tuple[float, float]], t: float) -> float | None:
            lo = bisect.bisect_left(values, (t - step, -math.inf))
            hi = bisect.bisect_right(values, (t, math.inf))
            window = sorted(v for _, v in values[lo:hi])
            return results.quantile(window, cfg.percentile) if window else None

        def count(kind: WorkerKind, t: float) -> int:
            return sum(
                1 for w in self.workers
                if w.kind == kind and w.created <= t and (w.removed_at is None or w.removed_at > t)
            )  # fmt: skip

        timeline = []
        for k in range(int(end // step) + 1):
            t = k * step
            p, d = (
                (0, count("aggregated", t))
                if s.arrivals == "aggregated"
                else (count("prefill", t), count("decode", t))
            )
            timeline.append(results.TimelinePoint(t, p, d, recent(firsts, t), recent(lasts, t)))
        return results.Result(
            workload=self.workload.name,
            strategy=s.name,
            outcomes=tuple(outcomes),
            gpu_seconds=gpu_seconds,
            duration=end,
            timeline=tuple(timeline),
            decisions=tuple(self.decisions),
            ttft_slo=cfg.ttft_slo,
            tpot_slo=cfg.tpot_slo,
        )

    # -- autoscalers -----------------------------------------------------------

    def role_inputs(self, role: autoscaling.Role) -> autoscaling.RoleInputs:
        """What Prometheus would read over the window (a :class:`~tandem.autoscaling.signals.Snapshot`),
        made the planner's inputs by the same :func:`~tandem.autoscaling.signals.role_inputs`
        as the operator's and local mode's."""
        cfg = self.config
        kind: WorkerKind = role
        pool = self.pool(kind)
        ready = [w for w in pool if w.ready_at <= self.now]
        warm = [w for w in ready if self.now - w.ready_at >= cfg.warmup]
        ids = {w.id for w in warm}
        serving = {w.id for w in ready}
        start = self.now - cfg.window
        # Rates over the part of the window the trace covers (Prometheus' rate()
        # extrapolates the same way), so that the trace's start is no ramp.
        span = min(cfg.window, self.now)
        if role == "prefill":
            in_step = {id(r) for w in warm for r, _ in w.step_chunks}
            queue = sum(
                1 for w in warm for r in w.queue if r.prefilled == 0 and id(r) not in in_step
            )
            done = self.prompt_done.window(start, self.now, serving)
            snapshot = signals.Snapshot(
                targets=len(ready),
                warm=len(warm),
                engine_waiting=float(queue),
                ttft=_weighted_quantile(
                    self.worker_ttft.window(start, self.now, ids), cfg.percentile
                ),
                request_rate=len(done) / span,
                prompt_token_rate=sum(v for v, _ in done) / span,
            )
        else:
            queue = sum(len(w.waiting) + w.transferring for w in warm)
            kv = [min(1.0, (w.kv_tokens(self.now) + w.pending_kv) / self.capacity) for w in ready]
            snapshot = signals.Snapshot(
                targets=len(ready),
                warm=len(warm),
                engine_waiting=float(queue),
                router_queued=float(len(self.router["decode"])),
                tpot=_weighted_quantile(self.itl.window(start, self.now, ids), cfg.percentile),
                kv_usage=sum(kv) / len(kv) if kv else None,
                request_rate=len(self.finished.window(start, self.now, serving)) / span,
            )
        return signals.role_inputs(role, snapshot, replicas=len(pool), ready=len(ready))

    def apply(self, role: autoscaling.Role, target: int, reason: str) -> None:
        kind: WorkerKind = role
        current = len(self.pool(kind))
        if target == current:
            return
        self.decisions.append(results.Decision(self.now, role, current, target, reason))
        for _ in range(target - current):
            self.add_worker(kind, self.config.provisioning_delay)
        for _ in range(current - target):
            self.remove_worker(kind)

    def size(self, role: autoscaling.Role) -> int:
        return len(self.pool(role))

    def busy_fractions(self, role: autoscaling.Role) -> list[float]:
        start = self.now - self.config.window
        return [
            w.busy_in(max(start, w.ready_at), self.now) / (self.now - max(start, w.ready_at))
            for w in self.pool(role) if self.now > w.ready_at
        ]  # fmt: skip


def replay(
    workload: workloads.Workload,
    strategy: strategies.Strategy,
    config: settings.ReplayConfig | None = None,
) -> results.Result:
    """Run ``workload`` through ``strategy``'s pools; every request's outcome and the cost."""
    return _Sim(workload, strategy, config or settings.ReplayConfig()).run()

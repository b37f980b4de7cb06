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

Strategies: :class:`Static` pools, :class:`Colocated` pools, an HPA-style
:class:`Hpa` on GPU busy time, and :class:`Tandem` (the planner of
:mod:`.autoscaling`, fed every ``interval`` with metrics measured the way
:mod:`.metrics_source` measures them: latency and queue from warm workers, load
from every ready one, percentiles over the window). Workers a strategy adds cost GPU-seconds from the moment they are asked
for and serve after ``provisioning_delay``; removed workers drain first.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tandem import roles
from tandem.autoscaling import planner as autoscaling
from tandem.autoscaling import signals
from tandem.workers.emulator import timing

__all__ = [
    "Colocated",
    "EngineModel",
    "Hpa",
    "ReplayConfig",
    "Request",
    "RequestOutcome",
    "Result",
    "Scheduled",
    "Static",
    "Strategy",
    "Tandem",
    "Workload",
    "bursty",
    "diurnal",
    "oscillations",
    "replay",
    "shifting",
    "steady",
]

WorkerKind = roles.WorkerKind


# ---------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Request:
    arrival: float
    """Seconds from the start of the trace."""
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    """A named trace."""

    name: str
    requests: tuple[Request, ...]
    duration: float
    """Seconds the trace spans (arrivals lie in ``[0, duration)``)."""
    description: str = ""


def _lengths(rng: random.Random, mean: float, sigma: float, low: int, high: int) -> int:
    """A log-normal length with the given mean, clipped to ``[low, high]``."""
    mu = math.log(mean) - sigma * sigma / 2
    return max(low, min(high, round(rng.lognormvariate(mu, sigma))))


MAX_MODEL_LEN = 8192
"""Longest prompt plus output a trace holds (``--max-model-len``)."""


def _poisson(
    rng: random.Random,
    duration: float,
    rate: Callable[[float], float],
    peak: float,
    prompt: Callable[[float], float],
    output: Callable[[float], float],
) -> tuple[Request, ...]:
    """A non-homogeneous Poisson process by thinning; log-normal lengths whose
    means may depend on time, prompt plus output within ``MAX_MODEL_LEN``."""
    out: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return tuple(out)
        if rng.random() * peak <= rate(t):
            o = _lengths(rng, output(t), 0.6, 2, MAX_MODEL_LEN // 2)
            p = _lengths(rng, prompt(t), 0.6, 16, MAX_MODEL_LEN - o)
            out.append(Request(t, p, o))


def steady(
    rate: float = 30.0,
    duration: float = 1800.0,
    prompt: float = 2000.0,
    output: float = 250.0,
    seed: int = 1,
) -> Workload:
    """Poisson arrivals at a constant rate; log-normal lengths around the means."""
    rng = random.Random(seed)
    requests = _poisson(rng, duration, lambda t: rate, rate, lambda t: prompt, lambda t: output)
    return Workload(
        "steady", requests, duration, f"{rate:g} req/s, prompt ~{prompt:g}, output ~{output:g}"
    )


def bursty(
    base: float = 10.0,
    peak: float = 40.0,
    period: float = 900.0,
    burst: float = 240.0,
    ramp: float = 60.0,
    duration: float = 3600.0,
    prompt: float = 2000.0,
    output: float = 250.0,
    seed: int = 2,
) -> Workload:
    """``base`` req/s with a burst to ``peak`` lasting ``burst`` seconds every
    ``period`` (each edge a linear ramp of ``ramp`` seconds)."""

    def rate(t: float) -> float:
        x = (t % period) - (period - burst) / 2
        if x < -ramp or x > burst + ramp:
            return base
        if x < 0:
            return base + (peak - base) * (x + ramp) / ramp
        if x > burst:
            return base + (peak - base) * (burst + ramp - x) / ramp
        return peak

    rng = random.Random(seed)
    requests = _poisson(rng, duration, rate, peak, lambda t: prompt, lambda t: output)
    desc = f"{base:g}→{peak:g} req/s bursts of {burst:g}s every {period:g}s ({ramp:g}s ramps)"
    return Workload("bursty", requests, duration, desc)


def diurnal(
    low: float = 5.0,
    high: float = 40.0,
    period: float = 3600.0,
    duration: float = 3600.0,
    prompt: float = 2000.0,
    output: float = 250.0,
    seed: int = 4,
) -> Workload:
    """A day compressed into ``period``: the rate follows a cosine from ``low`` up
    to ``high`` and back."""

    def rate(t: float) -> float:
        return low + (high - low) * (1 - math.cos(2 * math.pi * t / period)) / 2

    rng = random.Random(seed)
    requests = _poisson(rng, duration, rate, high, lambda t: prompt, lambda t: output)
    desc = f"{low:g}→{high:g}→{low:g} req/s over {period:g}s (cosine)"
    return Workload("diurnal", requests, duration, desc)


def shifting(
    duration: float = 3600.0,
    prompt_heavy: tuple[float, float, float] = (12.0, 5000.0, 64.0),
    generation_heavy: tuple[float, float, float] = (24.0, 300.0, 1000.0),
    transition: float = 300.0,
    seed: int = 3,
) -> Workload:
    """First half prompt-heavy, second half generation-heavy: ``(rate, prompt,
    output)`` of each, blended linearly over ``transition`` seconds in the middle."""

    def mix(t: float) -> float:
        return min(1.0, max(0.0, (t - (duration - transition) / 2) / transition))

    def blend(i: int) -> Callable[[float], float]:
        a, b = prompt_heavy[i], generation_heavy[i]
        return lambda t: a + (b - a) * mix(t)

    rng = random.Random(seed)
    peak = max(prompt_heavy[0], generation_heavy[0])
    requests = _poisson(rng, duration, blend(0), peak, blend(1), blend(2))
    desc = (
        f"{prompt_heavy[0]:g} req/s prompt ~{prompt_heavy[1]:g} output ~{prompt_heavy[2]:g}, "
        f"then {generation_heavy[0]:g} req/s prompt ~{generation_heavy[1]:g} "
        f"output ~{generation_heavy[2]:g}"
    )
    return Workload("shifting", requests, duration, desc)


# ---------------------------------------------------------------------------
# The engine's costs


@dataclass(frozen=True)
class EngineModel:
    """One worker: its GPU and model (the emulator's roofline) and vLLM's knobs."""

    gpu: timing.GpuSpec = timing.H100
    shape: timing.ModelShape = timing.LLAMA_3_1_8B
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    """Token budget of a step (vLLM's default on 80 GB GPUs for the API server)."""
    gpu_memory_utilization: float = 0.9
    kv_link_bandwidth: float = 25e9
    """Bytes/s between a prefill and a decode worker."""
    step_overhead: float = 0.001
    """Seconds added to every step (scheduling, launches; the calibration on an H100
    measured 0.5-1 ms at batch 1)."""

    @property
    def kv_capacity(self) -> int:
        """Tokens of KV cache one worker holds."""
        return timing.kv_capacity_tokens(self.shape, self.gpu, self.gpu_memory_utilization)

    def costs(self) -> _Costs:
        s = self.shape
        one = timing.step_flops(s, [timing.SeqWork(1, 0)])
        per_context = timing.step_flops(s, [timing.SeqWork(1, 1)]) - one
        weights = timing.step_bytes(s, [])
        kv = timing.step_bytes(s, [timing.SeqWork(1, 0)]) - weights
        return _Costs(
            self, one, per_context, weights, kv, self.gpu.effective_flops,
            self.gpu.effective_bandwidth,
        )  # fmt: skip


@dataclass(frozen=True)
class _Costs:
    """``timing``'s step cost, linear in (sequences, context) for decode tokens."""

    engine: EngineModel
    decode_flops: float
    """FLOPs of one decode token over no context."""
    context_flops: float
    """FLOPs each cached token adds to one decode token."""
    weight_bytes: float
    kv_bytes: float
    """Bytes of KV per token held."""
    flops_rate: float
    bytes_rate: float

    def step(self, n: int, context: float, chunks: Sequence[tuple[int, int]] = ()) -> float:
        """Seconds of a step with ``n`` decode tokens over ``context`` cached tokens in
        all, plus prefill ``chunks`` of ``(new_tokens, cached_before)``."""
        flops = n * self.decode_flops + self.context_flops * context
        kv_tokens = context + n
        for new, cached in chunks:
            flops += timing.prefill_flops(self.engine.shape, new, cached)
            kv_tokens += new + cached
        if n == 0 and not chunks:
            return 0.0
        seconds = max(
            flops / self.flops_rate,
            (self.weight_bytes + self.kv_bytes * kv_tokens) / self.bytes_rate,
        )
        return seconds + self.engine.step_overhead

    def transfer(self, tokens: int) -> float:
        return timing.kv_transfer_time(self.kv_bytes * tokens, self.engine.kv_link_bandwidth)


# ---------------------------------------------------------------------------
# Strategies


@dataclass(frozen=True)
class Static:
    """Fixed disaggregated pools."""

    prefill: int
    decode: int
    name: str = "static"


@dataclass(frozen=True)
class Colocated:
    """Fixed aggregated workers: each prefills and decodes."""

    workers: int
    name: str = "colocated"


@dataclass(frozen=True)
class Hpa:
    """A utilization-style autoscaler, as a Kubernetes HPA on a GPU-utilization
    metric (DCGM's ``GPU_UTIL``: the fraction of time a kernel runs) would do:
    ``desired = ceil(sum(util) / target)`` over ready pods, 10% tolerance,
    scale-up at once, scale-down to the highest recommendation of 5 minutes."""

    prefill: int
    decode: int
    bounds: tuple[autoscaling.RoleBounds, autoscaling.RoleBounds]
    """(prefill, decode) replica bounds."""
    target: float = 0.7
    tolerance: float = 0.1
    scale_down_stabilization: float = 300.0
    name: str = "hpa"


@dataclass(frozen=True)
class Tandem:
    """The planner of :mod:`.autoscaling`, fed from the simulated metrics."""

    prefill: int
    decode: int
    spec: autoscaling.PlannerSpec
    name: str = "tandem"


@dataclass(frozen=True)
class Scheduled:
    """Pools that follow a schedule known in advance: each change names the sizes
    that serve from its time on. Workers for a growth are asked for one
    provisioning delay early; a shrink drains at its time. With a schedule read
    off the trace in hindsight, the ceiling any autoscaler could reach."""

    prefill: int
    decode: int
    changes: tuple[tuple[float, int, int], ...]
    """``(time, prefill, decode)``, in time order."""
    name: str = "scheduled"

    @property
    def start(self) -> tuple[int, int]:
        """``(prefill, decode)`` at time 0."""
        return self.prefill, self.decode


Strategy = Static | Colocated | Hpa | Tandem | Scheduled


@dataclass(frozen=True)
class ReplayConfig:
    """How the cluster around the workers behaves."""

    engine: EngineModel = field(default_factory=EngineModel)
    ttft_slo: float = 0.5
    tpot_slo: float = 0.025
    provisioning_delay: float = 60.0
    """Seconds from asking for a worker to its serving (scheduling, image, weights)."""
    warmup: float = 120.0
    """Seconds after a worker is ready before its samples count (autoscalers only):
    the CRD's default. At least ``window``, so that no signal of a warm worker
    still holds the time before the workers that just joined served."""
    interval: float = 15.0
    """Seconds between autoscaler ticks."""
    window: float = 60.0
    """Seconds of history each tick's signals are measured over."""
    percentile: float = 99.0
    """Percentile the signals report (what ``slo.percentile`` would be)."""
    timeline_step: float = 15.0
    """Seconds between points of the result's timelines."""


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class RequestOutcome:
    request: Request
    ttft: float
    tpot: float
    """Mean seconds per output token after the first (0 for a single token)."""
    finish: float


@dataclass(frozen=True)
class TimelinePoint:
    time: float
    prefill: int
    """Workers of the role asked for (provisioning, serving or draining)."""
    decode: int
    ttft: float | None
    """The percentile over the last ``timeline_step`` of requests that got a first token."""
    tpot: float | None


@dataclass(frozen=True)
class Decision:
    time: float
    role: autoscaling.Role
    before: int
    after: int
    reason: str


@dataclass(frozen=True)
class Result:
    workload: str
    strategy: str
    outcomes: tuple[RequestOutcome, ...]
    gpu_seconds: float
    duration: float
    timeline: tuple[TimelinePoint, ...]
    decisions: tuple[Decision, ...]
    ttft_slo: float
    tpot_slo: float

    def _share(self, ok: Callable[[RequestOutcome], bool]) -> float:
        return sum(1 for o in self.outcomes if ok(o)) / len(self.outcomes) if self.outcomes else 0.0

    @property
    def ttft_attainment(self) -> float:
        return self._share(lambda o: o.ttft <= self.ttft_slo)

    @property
    def tpot_attainment(self) -> float:
        return self._share(lambda o: o.tpot <= self.tpot_slo)

    @property
    def attainment(self) -> float:
        """Share of requests within both SLOs."""
        return self._share(lambda o: o.ttft <= self.ttft_slo and o.tpot <= self.tpot_slo)

    @property
    def goodput(self) -> float:
        """Requests per second that met both SLOs."""
        return self.attainment * len(self.outcomes) / self.duration

    @property
    def mean_gpus(self) -> float:
        return self.gpu_seconds / self.duration

    def percentile(self, metric: Literal["ttft", "tpot"], q: float) -> float:
        values = sorted(o.ttft if metric == "ttft" else o.tpot for o in self.outcomes)
        return _quantile(values, q) if values else math.nan


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def oscillations(decisions: Iterable[Decision], role: autoscaling.Role, within: float) -> int:
    """Up-down-up (or down-up-down) reversals of a role's size that happened within
    ``within`` seconds: the flapping a stabilization window should prevent."""
    moves = [(d.time, 1 if d.after > d.before else -1) for d in decisions if d.role == role]
    moves = [m for m in moves if m[1]]
    changes: list[tuple[float, int]] = []
    for t, sign in moves:
        if not changes or changes[-1][1] != sign:
            changes.append((t, sign))
    return sum(
        1
        for a, _, c in zip(changes, changes[1:], changes[2:], strict=False)
        if c[0] - a[0] <= within
    )


# ---------------------------------------------------------------------------
# The simulation


@dataclass(eq=False)
class _Req:
    request: Request
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
    def __init__(self, workload: Workload, strategy: Strategy, config: ReplayConfig) -> None:
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
        self.outcomes: list[RequestOutcome] = []
        self.decisions: list[Decision] = []
        self.worker_ttft = _Samples()
        self.itl = _Samples()
        self.prompt_done = _Samples()
        self.finished = _Samples()
        self.planner_state = autoscaling.PlannerState()
        self.hpa_history: dict[autoscaling.Role, list[tuple[float, int]]] = {
            "prefill": [], "decode": []
        }  # fmt: skip

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
        self.outcomes.append(RequestOutcome(r, first - r.arrival, tpot, self.now))
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
        self.dispatch("aggregated" if isinstance(self.strategy, Colocated) else "prefill", req)

    def on_transferred(self, w: _Worker, req: _Req) -> None:
        w.transferring -= 1
        w.arrived.append(req)
        self.interrupt(w)

    def on_ready(self, w: _Worker) -> None:
        queued = self.router[w.kind]
        while queued and w.ready(self.now):
            self.dispatch(w.kind, queued.popleft())

    def run(self) -> Result:
        cfg = self.config
        s = self.strategy
        if isinstance(s, Colocated):
            sizes: dict[WorkerKind, int] = {"aggregated": s.workers}
        else:
            sizes = {"prefill": s.prefill, "decode": s.decode}
        for kind, count in sizes.items():
            for _ in range(count):
                self.workers.append(_Worker(len(self.workers), kind, 0.0, -cfg.warmup))
        for i, r in enumerate(self.workload.requests):
            self.at(r.arrival, functools.partial(self.on_arrival, _Req(r, i)))
        if isinstance(s, Hpa | Tandem):
            ticks = int(self.workload.duration // cfg.interval)
            for k in range(1, ticks + 1):
                self.at(k * cfg.interval, self.tick)
        elif isinstance(s, Scheduled):
            self.schedule(s)
        budget = 100 * len(self.workload.requests) + 100_000
        while self.events:
            budget -= 1
            if budget < 0:
                raise RuntimeError("replay did not converge (event budget spent)")
            self.now, _, action = heapq.heappop(self.events)
            action()
        return self.result()

    def result(self) -> Result:
        s, cfg, end = self.strategy, self.config, self.workload.duration
        gpu_seconds = 0.0
        for w in self.workers:
            stop = end if w.removed_at is None else min(end, w.removed_at)
            tp = 1
            if isinstance(s, Tandem):
                role: autoscaling.Role = "prefill" if w.kind == "prefill" else "decode"
                tp = s.spec.bounds(role).tensor_parallel_size
            gpu_seconds += max(0.0, stop - max(0.0, w.created)) * tp
        outcomes = sorted(self.outcomes, key=lambda o: o.request.arrival)
        firsts = sorted((o.request.arrival + o.ttft, o.ttft) for o in outcomes)
        lasts = sorted((o.finish, o.tpot) for o in outcomes)
        step = cfg.timeline_step

        def recent(values: list[tuple[float, float]], t: float) -> float | None:
            lo = bisect.bisect_left(values, (t - step, -math.inf))
            hi = bisect.bisect_right(values, (t, math.inf))
            window = sorted(v for _, v in values[lo:hi])
            return _quantile(window, cfg.percentile) if window else None

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
                if isinstance(s, Colocated)
                else (count("prefill", t), count("decode", t))
            )
            timeline.append(TimelinePoint(t, p, d, recent(firsts, t), recent(lasts, t)))
        return Result(
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

    def schedule(self, s: Scheduled) -> None:
        """Ask for each change's growth a provisioning delay ahead, shrink on time."""
        sizes: dict[autoscaling.Role, int] = {"prefill": s.prefill, "decode": s.decode}
        for t, prefill, decode in s.changes:
            moves: tuple[tuple[autoscaling.Role, int], ...] = (
                ("prefill", prefill),
                ("decode", decode),
            )
            for role, size in moves:
                if size == sizes[role]:
                    continue
                ahead = self.config.provisioning_delay if size > sizes[role] else 0.0
                when = max(0.0, t - ahead)
                self.at(when, functools.partial(self.apply, role, size, f"scheduled for {t:g}s"))
                sizes[role] = size

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
        self.decisions.append(Decision(self.now, role, current, target, reason))
        for _ in range(target - current):
            self.add_worker(kind, self.config.provisioning_delay)
        for _ in range(current - target):
            self.remove_worker(kind)

    def tick(self) -> None:
        s = self.strategy
        if isinstance(s, Tandem):
            inputs = autoscaling.Inputs(
                decode=self.role_inputs("decode"), prefill=self.role_inputs("prefill")
            )
            plan = autoscaling.decide(s.spec, inputs, self.planner_state, self.now)
            self.planner_state = plan.state
            for d in plan.decisions:
                if d.replicas is not None:
                    self.apply(d.role, d.replicas, d.reason)
        elif isinstance(s, Hpa):
            self.hpa_tick(s, "prefill", s.bounds[0])
            self.hpa_tick(s, "decode", s.bounds[1])

    def hpa_tick(self, s: Hpa, role: autoscaling.Role, bounds: autoscaling.RoleBounds) -> None:
        kind: WorkerKind = role
        pool = self.pool(kind)
        current = len(pool)
        start = self.now - self.config.window
        utils = [
            w.busy_in(max(start, w.ready_at), self.now) / (self.now - max(start, w.ready_at))
            for w in pool if self.now > w.ready_at
        ]  # fmt: skip
        if not utils:
            return
        mean = sum(utils) / len(utils)
        ratio = mean / s.target
        desired = current if abs(ratio - 1) <= s.tolerance else math.ceil(sum(utils) / s.target)
        desired = bounds.clamp(max(desired, 1))
        window = s.scale_down_stabilization
        history = [(t, n) for t, n in self.hpa_history[role] if t > self.now - window]
        history.append((self.now, desired))
        self.hpa_history[role] = history
        if desired > current:  # the HPA's default policy: at most double, or +4
            target = min(desired, max(2 * current, current + 4))
        else:
            target = min(current, max(n for _, n in history))
        self.apply(
            role, target, f"{role} {current}→{target}: GPU util {mean:.0%} (target {s.target:.0%})"
        )


def replay(workload: Workload, strategy: Strategy, config: ReplayConfig | None = None) -> Result:
    """Run ``workload`` through ``strategy``'s pools; every request's outcome and the cost."""
    return _Sim(workload, strategy, config or ReplayConfig()).run()

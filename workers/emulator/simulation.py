"""Replay a workload through the scheduler on virtual time, with no event loop.

``simulate(config, arrivals)`` is a discrete-event loop over :class:`.Scheduler`:
the same core the server runs, minus HTTP and sleeping. It answers "what would
this engine do with this traffic" in milliseconds, deterministically: what a test
of overload, or a planner's replay, needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tandem.workers.emulator import scheduling

__all__ = ["Arrival", "RequestTrace", "Sample", "SimulationResult", "simulate"]


@dataclass(frozen=True)
class Arrival:
    time: float
    spec: scheduling.RequestSpec


@dataclass(frozen=True)
class RequestTrace:
    """One finished request, with the latencies vLLM's metrics report."""

    finished: scheduling.FinishedRequest
    finish_time: float

    @property
    def request_id(self) -> str:
        return self.finished.request_id

    @property
    def ttft(self) -> float:
        return self.finished.first_token - self.finished.arrival

    @property
    def queue_time(self) -> float:
        return self.finished.scheduled - self.finished.arrival

    @property
    def e2e(self) -> float:
        return self.finish_time - self.finished.arrival

    @property
    def tpot(self) -> float:
        """Mean seconds per output token after the first (0 for a single token)."""
        f = self.finished
        n = f.generation_tokens - 1
        return (f.last_token - f.first_token) / n if n > 0 else 0.0


@dataclass(frozen=True)
class Sample:
    """The engine's state when a step starts."""

    time: float
    num_running: int
    num_waiting: int
    kv_usage: float
    step_tokens: int
    step_duration: float


@dataclass(frozen=True)
class SimulationResult:
    requests: tuple[RequestTrace, ...]
    samples: tuple[Sample, ...]
    transfers: tuple[scheduling.TransferDone, ...]
    end_time: float

    def trace(self, request_id: str) -> RequestTrace:
        return next(r for r in self.requests if r.request_id == request_id)


def simulate(
    config: scheduling.SchedulerConfig,
    arrivals: Iterable[Arrival],
    *,
    until: float | None = None,
) -> SimulationResult:
    """Run ``arrivals`` through a fresh scheduler until all finish (or ``until``)."""
    pending = sorted(arrivals, key=lambda a: a.time)
    scheduler = scheduling.Scheduler(config)
    traces: list[RequestTrace] = []
    samples: list[Sample] = []
    transfers: list[scheduling.TransferDone] = []
    now = pending[0].time if pending else 0.0
    index = 0
    while index < len(pending) or scheduler.has_work():
        if until is not None and now >= until:
            break
        while index < len(pending) and pending[index].time <= now:
            arrival = pending[index]
            scheduler.add(arrival.spec, arrival.time)
            index += 1
        transfers.extend(scheduler.advance(now))
        step = scheduler.schedule(now)
        if step is None:
            wake = [t for t in (scheduler.next_event_time(),) if t is not None]
            if index < len(pending):
                wake.append(pending[index].time)
            if not wake:
                raise RuntimeError("the scheduler holds work it can never run")
            now = max(now, min(wake))
            continue
        stats = scheduler.stats()
        samples.append(
            Sample(
                now,
                stats.num_running,
                stats.num_waiting,
                stats.kv_usage,
                step.num_tokens,
                step.duration,
            )
        )
        now += step.duration
        result = scheduler.complete(step, now)
        traces.extend(RequestTrace(f, now) for f in result.finished)
    return SimulationResult(tuple(traces), tuple(samples), tuple(transfers), now)

"""Workloads to replay: seeded request traces (steady, bursty, diurnal, shifting).

Pure and deterministic: a workload is a tuple of requests with arrival times and
prompt/output lengths drawn from a seeded generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_MODEL_LEN", "Request", "Workload", "bursty", "diurnal", "shifting", "steady"]


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

"""Capacity models of the planner: pure maths on plain numbers.

Erlang C (M/M/c) for the prefill pool's queueing delay, and the decode pool's
KV usage along the TPOT line (a decode step's time grows with the KV it reads).
:mod:`.planner` applies them to a pool's spec and state.
"""

from __future__ import annotations

import math

__all__ = [
    "decode_rate",
    "decode_workers_needed",
    "erlang_c",
    "kv_usage_on",
    "queue_wait_quantile_ok",
]


def erlang_c(servers: int, offered: float) -> float:
    """Probability that a request waits (Erlang C): ``servers`` workers, ``offered``
    load in workers (arrival rate x mean service time); 1 when ``offered >= servers``."""
    if servers < 1 or offered >= servers:
        return 1.0
    if offered <= 0:
        return 0.0
    blocking = 1.0  # Erlang B by its recurrence, stable for any pool size
    for k in range(1, servers + 1):
        blocking = offered * blocking / (k + offered * blocking)
    return servers * blocking / (servers - offered * (1 - blocking))


def queue_wait_quantile_ok(
    servers: int, utilization: float, service: float, wait: float, q: float
) -> bool:
    """Whether ``servers`` workers at ``utilization`` keep the ``q`` quantile of the
    queueing delay within ``wait`` seconds (M/M/c: ``P(W > t) = C · e^(-(c-a)t/s)``,
    with mean service time ``service``; exponential service times make it cautious)."""
    if wait <= 0:
        return False
    offered = servers * utilization
    tail = erlang_c(servers, offered) * math.exp(-(servers - offered) * wait / service)
    return tail <= 1 - q


def decode_rate(usage: float, workers: int, line: tuple[float, float] | None) -> float:
    """The decode load of ``workers`` at mean KV ``usage``: what the pool would
    carry at any size.

    The KV a worker holds is its sequences times their context, and a sequence
    stays for its output tokens times the step time, which grows with the KV held
    (:func:`tpot_line`). So fewer workers hold more than their share, and usage
    is not conserved across pool sizes: the rate at which sequences pass through,
    in KV units, ``usage * workers / tpot(usage)``, is. Without a line the usage is
    taken as proportional (``usage * workers``)."""
    if line is None:
        return usage * workers
    floor, slope = line
    return usage * workers / (floor + slope * usage)


def kv_usage_on(rate: float, workers: int, line: tuple[float, float] | None) -> float:
    """The mean KV usage of ``workers`` carrying decode ``rate`` (inverse of
    :func:`decode_rate`); infinite where they cannot carry it."""
    if line is None:
        return rate / max(workers, 1)
    floor, slope = line
    room = workers - rate * slope
    return rate * floor / room if room > 0 else math.inf


def decode_workers_needed(rate: float, target: float, line: tuple[float, float] | None) -> float:
    """Decode workers that carry ``rate`` (:func:`decode_rate`) at a mean KV usage
    of at most ``target``; fractional, so that ``ceil`` of it is the pool that fits."""
    if target <= 0:
        return math.inf
    if line is None:
        return rate / target
    floor, slope = line
    return rate * (slope + floor / target)

"""SLO attainment: the share of recent requests that met the latency objectives. Pure.

The orchestrator :meth:`~Tracker.record` s each finished stream's TTFT and TPOT; the
metrics collector :meth:`~Tracker.read` s the shares over the last ``window``
seconds when ``/metrics`` is scraped. Both take the clock as an argument.

Counts live in a ring of at most :data:`MAX_BUCKETS` time buckets (one per second
up to a 10 min window, wider beyond), so a request costs O(1) and memory stays
fixed however busy the pool is; a read sums the ring (600 slots: microseconds, once
per scrape). The window's edge is as coarse as a bucket: a request leaves the
window within one bucket of being ``window`` seconds old.

A request with no TPOT (one token, or fewer than two spaced events) meets the TPOT
objective: it had nothing to miss. An objective that is not set is met by every
request, so ``both`` is the share that met every objective set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MAX_BUCKETS", "Attainment", "Tracker"]

MAX_BUCKETS = 600
"""Slots of the ring: one-second buckets up to a 10 min window."""


@dataclass(frozen=True)
class Attainment:
    """The shares (0 to 1) of the window's requests that met each objective."""

    requests: int
    """Requests that finished within the window."""
    ttft: float | None
    """None when no request finished, or no TTFT objective is set."""
    tpot: float | None
    """None when no request finished, or no TPOT objective is set."""
    both: float | None
    """Met every objective set; None when no request finished."""


class Tracker:
    """Requests per time bucket over a sliding window, by the objectives they met."""

    def __init__(self, *, ttft: float | None, tpot: float | None, window: float) -> None:
        if window <= 0:
            raise ValueError(f"the attainment window must be positive, not {window}")
        self.ttft = ttft
        self.tpot = tpot
        self.window = window
        self._slots = min(MAX_BUCKETS, math.ceil(window))
        self._width = window / self._slots
        n = self._slots
        self._tick = [-1] * n
        """Which bucket (``floor(now / width)``) each slot counts now."""
        self._total = [0] * n
        self._ttft_ok = [0] * n
        self._tpot_ok = [0] * n
        self._both_ok = [0] * n

    def record(self, now: float, ttft: float, tpot: float | None) -> None:
        """One finished request: its time to first token and per output token (s)."""
        tick = math.floor(now / self._width)
        i = tick % self._slots
        if self._tick[i] != tick:  # the slot's bucket left the window: reuse it
            self._tick[i] = tick
            self._total[i] = self._ttft_ok[i] = self._tpot_ok[i] = self._both_ok[i] = 0
        ttft_ok = self.ttft is None or ttft <= self.ttft
        tpot_ok = self.tpot is None or tpot is None or tpot <= self.tpot
        self._total[i] += 1
        self._ttft_ok[i] += ttft_ok
        self._tpot_ok[i] += tpot_ok
        self._both_ok[i] += ttft_ok and tpot_ok

    def read(self, now: float) -> Attainment:
        """The shares over the buckets of the last ``window`` seconds (to ``now``)."""
        tick = math.floor(now / self._width)
        total = ttft = tpot = both = 0
        for i, at in enumerate(self._tick):
            if tick - self._slots < at <= tick:
                total += self._total[i]
                ttft += self._ttft_ok[i]
                tpot += self._tpot_ok[i]
                both += self._both_ok[i]
        if total == 0:
            return Attainment(0, None, None, None)
        return Attainment(
            requests=total,
            ttft=None if self.ttft is None else ttft / total,
            tpot=None if self.tpot is None else tpot / total,
            both=both / total,
        )

"""How the simulated cluster around the workers behaves."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.replay import engine

__all__ = ["ReplayConfig"]


@dataclass(frozen=True)
class ReplayConfig:
    """How the cluster around the workers behaves."""

    engine: engine.EngineModel = field(default_factory=engine.EngineModel)
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

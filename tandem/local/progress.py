"""Local mode's start-up progress: what each worker is doing while the pool starts.

One line per worker (role and index, pid, phase, seconds so far). On a terminal the
lines are redrawn in place; otherwise (CI logs, pipes) a line is printed only when a
worker's phase changes, with no control characters. When every worker is ready, a
breakdown says where each one's start went, phase by phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tandem.workers import phases

__all__ = ["Progress", "Watched", "breakdown", "line"]


class Watched(Protocol):
    """What progress needs of a worker process (``launcher.WorkerProcess`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def phase(self) -> phases.Phase: ...

    @property
    def elapsed(self) -> float: ...

    def refresh_phase(self) -> phases.Phase: ...


def line(name: str, pid: int | None, phase: phases.Phase, seconds: float) -> str:
    """``prefill-0  pid 4242  loading the model  23s``."""
    return (
        f"  {name:<10} pid {pid if pid is not None else '-':<7} {phase.value:<20} {seconds:4.0f}s"
    )


def breakdown(name: str, changes: Sequence[tuple[phases.Phase, float]]) -> str:
    """``prefill-0 started in 58s: importing 21s · starting the engine 4s · ...``: the
    seconds each phase took, from the times the worker entered them."""
    parts = []
    for (phase, start), (_, end) in itertools.pairwise(changes):
        parts.append(f"{phase.value} {end - start:.0f}s")
    total = changes[-1][1] if changes else 0.0
    return f"  {name} started in {total:.0f}s: " + " · ".join(parts)


@dataclass
class Progress:
    """Shows the workers' start; ``watch`` until cancelled, then ``finish``."""

    out: Callable[[str], None]
    tty: bool
    interval: float = 0.5
    changes: dict[str, list[tuple[phases.Phase, float]]] = field(default_factory=dict)
    _drawn: int = 0

    def _observe(self, workers: Sequence[Watched]) -> list[Watched]:
        """Refresh every worker's phase; the ones whose phase changed."""
        moved = []
        for w in workers:
            phase = w.refresh_phase()
            seen = self.changes.setdefault(w.name, [])
            if not seen:
                seen.append((phases.Phase.IMPORTING, 0.0))  # from the worker's start
                moved.append(w)
            if seen[-1][0] is not phase:
                seen.append((phase, w.elapsed))
                if w not in moved:
                    moved.append(w)
        return moved

    def _draw(self, workers: Sequence[Watched]) -> None:
        lines = [line(w.name, w.pid, w.phase, w.elapsed) for w in workers]
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.out(up + "\n".join(text + "\x1b[K" for text in lines))
        self._drawn = len(lines)

    def update(self, workers: Sequence[Watched]) -> None:
        moved = self._observe(workers)
        if self.tty:
            self._draw(workers)
            return
        for w in moved:
            self.out(line(w.name, w.pid, w.phase, w.elapsed))

    async def watch(self, workers: Sequence[Watched]) -> None:
        """Update every ``interval`` until cancelled."""
        while True:
            self.update(workers)
            await asyncio.sleep(self.interval)

    def finish(self, workers: Sequence[Watched]) -> None:
        """The last picture (everyone ready) and where each start's time went."""
        self.update(workers)
        for w in workers:
            self.out(breakdown(w.name, self.changes.get(w.name, [])))


@contextlib.asynccontextmanager
async def shown(progress: Progress | None, workers: Sequence[Watched]) -> AsyncIterator[None]:
    """Watch ``workers`` while the body waits for them."""
    if progress is None:
        yield
        return
    task = asyncio.create_task(progress.watch(workers), name="start-progress")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

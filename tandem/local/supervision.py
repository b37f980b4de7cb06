"""Local mode's kubelet: a worker that dies is taken out of the router and restarted.

Every ``interval`` the supervisor looks at each worker process; one that exited
(crashed, killed, out of memory) leaves the router at once, so no new request goes
to it (the router moves the streams it was serving to another decode worker), and
a replacement is started after a backoff that doubles on each death of the same
worker (``1 s, 2 s, 4 s`` up to ``max_backoff``) and resets once a worker has run
for ``stable_after``. The replacement joins the router when it answers ``/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem import roles
from tandem.local import planning, processes
from tandem.workers import launcher

__all__ = ["Backoff", "Supervisor"]


@dataclass
class Backoff:
    """Restart delays of one worker slot: doubling, capped, reset after a stable run."""

    first: float = 1.0
    cap: float = 30.0
    stable_after: float = 60.0
    deaths: int = 0
    started: float = 0.0

    def next_delay(self, now: float) -> float:
        if self.started and now - self.started >= self.stable_after:
            self.deaths = 0
        self.deaths += 1
        return float(min(self.cap, self.first * 2.0 ** (self.deaths - 1)))


@dataclass
class Supervisor:
    """Restarts the pool's workers that die (see the module docstring)."""

    pool: processes.LocalPool
    out: Callable[[str], None]
    startup_timeout_s: float = 600.0
    interval: float = 0.5
    clock: Callable[[], float] = time.monotonic
    backoffs: dict[str, Backoff] = field(default_factory=dict)
    restarts: int = 0

    def _dead(self) -> list[tuple[roles.Role, int, processes.Worker]]:
        found: list[tuple[roles.Role, int, processes.Worker]] = []
        for role, workers in self.pool.workers.items():
            for index, worker in enumerate(workers):
                if isinstance(worker, launcher.WorkerProcess) and worker.returncode is not None:
                    found.append((role, index, worker))
        return found

    async def _replace(self, role: roles.Role, worker: processes.Worker) -> None:
        spawn = self.pool.spawn
        assert spawn is not None
        slot = self.backoffs.setdefault(worker.name, Backoff())
        delay = slot.next_delay(self.clock())
        code = worker.returncode if isinstance(worker, launcher.WorkerProcess) else None
        self.out(f"supervise: {worker.name} (pid {worker.pid}) exited ({code}); "
                 f"out of the router, restarting in {delay:.0f}s")  # fmt: skip
        workers = self.pool.workers[role]
        workers.remove(worker)
        self.pool.set_endpoints(role, [w.url for w in workers])
        await worker.stop()  # reap its process group and shared memory
        index = int(worker.name.rsplit("-", 1)[-1]) if worker.name[-1].isdigit() else len(workers)
        while True:
            await asyncio.sleep(delay)
            fresh = spawn(role, index)
            fresh.start()
            try:
                await fresh.wait_ready(self.startup_timeout_s)
            except (planning.LocalModeError, launcher.WorkerError) as exc:
                await fresh.stop()
                delay = slot.next_delay(self.clock())
                self.out(f"supervise: {fresh.name} did not start ({exc}); again in {delay:.0f}s")
                continue
            except asyncio.CancelledError:
                await fresh.stop()  # the pool is stopping: leave nothing behind
                raise
            break
        slot.started = self.clock()
        workers.append(fresh)
        self.pool.set_endpoints(role, [w.url for w in workers])
        self.restarts += 1
        self.out(f"supervise: {fresh.name} (pid {fresh.pid}) is back in the router")

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set; replacements in progress are cancelled then."""
        pending: set[asyncio.Task[None]] = set()
        handled: set[int] = set()
        try:
            while not stop.is_set():
                for role, _, worker in self._dead():
                    if id(worker) in handled:
                        continue
                    handled.add(id(worker))
                    task = asyncio.create_task(self._replace(role, worker))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
        finally:
            for task in list(pending):
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

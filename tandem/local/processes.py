"""Local mode's processes: the pool's workers as child processes and the router in
this event loop.

Every worker, real vLLM or the engine emulator, is a
:class:`tandem.workers.launcher.WorkerProcess` (one process wrapper: its own session,
log, health wait, stop and reaping); the emulator only changes the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tandem import roles
from tandem.local import planning, progress
from tandem.operator import api
from tandem.operator import planning as pool_planning
from tandem.workers import launcher

__all__ = ["LocalPool", "Worker", "build_worker", "running"]


class Worker(progress.Watched, Protocol):
    """What local mode needs of a worker process."""

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    async def wait_ready(self, startup_timeout_s: float | None = None) -> None: ...

    async def stop(self) -> int | None: ...


def build_worker(
    pool: api.InferencePool,
    plan: planning.WorkerPlan,
    settings: planning.LocalSettings,
    model: str | None,
) -> launcher.WorkerProcess:
    """The (unstarted) process of one planned worker."""
    args = pool_planning.engine_args(pool, plan.role)
    kind = pool_planning.engine_role(pool, plan.role)
    command: list[str] | None = None
    if settings.engine == "emulator":
        command = [sys.executable, "-m", "tandem.workers.emulator", "--port", str(plan.port),
                   "--role", kind, "--served-model-name", args.served_name,
                   "--log-level", "warning"]  # fmt: skip
        if args.max_num_seqs:
            command += ["--max-num-seqs", str(args.max_num_seqs)]
        if args.max_num_batched_tokens:
            command += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        if args.max_model_len:
            command += ["--max-model-len", str(args.max_model_len)]
    else:
        assert model is not None, "resolve_model() first"
    engine = dataclasses.replace(
        args,
        model=model or args.model,
        host="127.0.0.1",
        port=plan.port,
        # CPU workers: eager mode starts ~26 s sooner; KV staged in host memory.
        enforce_eager=True,
        kv_buffer_device="cpu",
    )
    return launcher.WorkerProcess(
        launcher.WorkerSettings(
            name=plan.name,
            role=kind,
            engine=engine,
            run_dir=settings.run_dir / plan.name,
            cpus=plan.cpus if command is None else None,
            command=command,
            startup_timeout_s=settings.startup_timeout_s,
        )
    )


@dataclass
class LocalPool:
    """A running local pool: its router URL and workers by role."""

    pool: api.InferencePool
    url: str
    workers: dict[roles.Role, list[Worker]]
    set_endpoints: Callable[[roles.Role, Sequence[str]], None]
    """Replace one role's workers in the router (the autoscaler calls it)."""
    spawn: Callable[[roles.Role, int], Worker] | None = None
    """Builds (does not start) the ``index``-th worker of a role, on a free port."""


@contextlib.asynccontextmanager
async def running(
    pool: api.InferencePool,
    settings: planning.LocalSettings,
    shown: progress.Progress | None = None,
) -> AsyncIterator[LocalPool]:
    """Start the pool's workers (``shown`` says what each is doing meanwhile) and
    the router; stop and reap everything on exit."""
    from tandem.router import server
    from tandem.router import settings as router_settings

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    model = planning.resolve_model(pool, settings) if settings.engine == "vllm" else None
    count = sum(planning.role_spec(pool, r).replicas.min for r in pool.roles())
    plans = planning.plan_workers(pool, launcher.free_ports(count), settings.cores)
    workers: dict[roles.Role, list[Worker]] = {role: [] for role in pool.roles()}
    for plan in plans:
        workers[plan.role].append(build_worker(pool, plan, settings, model))
    every = [w for ws in workers.values() for w in ws]
    try:
        for worker in every:
            worker.start()
        async with progress.shown(shown, every):
            await asyncio.gather(*(w.wait_ready(settings.startup_timeout_s) for w in every))
        if shown is not None:
            shown.finish(every)
        config = router_settings.static_settings(
            pool.spec.model.effective_served_name,
            prefill=[w.url for w in workers.get("prefill", [])],
            decode=[w.url for w in workers["decode"]],
            mode=pool.spec.mode,
            policy=pool.spec.router.policy,
            autoThresholdTokens=pool.spec.router.auto_threshold_tokens,
            maxQueuedRequests=pool.spec.router.max_queued_requests,
            poolName=pool.name,
            slo=pool.spec.slo.router_config(),
        )

        def spawn(role: roles.Role, index: int) -> Worker:
            [port] = launcher.free_ports(1)
            cpus = planning.cpu_sets(index + 1, settings.cores)[index] if settings.cores else None
            plan = planning.WorkerPlan(role, f"{role}-{index}", port, cpus)
            return build_worker(pool, plan, settings, model)

        async with server.serving(config, host=settings.host, port=settings.port) as (url, app):
            yield LocalPool(pool, url, workers, app.set_endpoints, spawn)
    finally:
        # Every worker: those started here, and any an autoscaler added since.
        current = [w for ws in workers.values() for w in ws if w not in every]
        await asyncio.gather(*(w.stop() for w in [*every, *current]), return_exceptions=True)

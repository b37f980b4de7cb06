"""Local mode: ``tandem up FILE`` runs a pool on this machine.

The router runs in this process (uvicorn in our event loop); prefill and decode
workers are child processes: real vLLM on the CPU (the default, with the tiny
model built on the spot when the pool names ``tandem/tiny-*``) or the engine
emulator (``--engine emulator``). The same pure pieces as in a cluster decide
the workers' arguments (:func:`tandem.operator.planning.engine_args`) and, with
``--autoscale``, their number (:mod:`tandem.operator.autoscaling`).

Ctrl-C stops the router first (no new requests), then every worker, and reaps
them; nothing is left behind outside the run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tandem.operator import api, planning, validation

logger = logging.getLogger(__name__)

Engine = Literal["vllm", "emulator"]
WorkerRole = Literal["prefill", "decode"]

TINY_MODEL_PREFIX = "tandem/tiny"
DEMO_PROMPT = (
    "Explain in one paragraph why prefill is compute-bound while decode is bound by "
    "memory bandwidth, and what splitting them across two pools buys."
)


class LocalModeError(Exception):
    """Local mode cannot run this pool as asked; the message says what to change."""


# ---------------------------------------------------------------------------
# Pure: what to run


@dataclass(frozen=True)
class WorkerPlan:
    """One worker to start: its role, name, port and (for vLLM) cores."""

    role: WorkerRole
    name: str
    port: int
    cpus: str | None


def cpu_sets(count: int, cores: int) -> list[str | None]:
    """Cores per worker: spread ``count`` workers over ``cores`` round-robin.

    vLLM on the CPU spins its OpenMP threads; two workers on one core halve each
    other, so with as many cores as workers each gets its own.
    """
    if cores <= 0:
        return [None] * count
    return [str(i % cores) for i in range(count)]


def plan_workers(
    pool: api.InferencePool,
    ports: Sequence[int],
    cores: int,
    replicas: dict[WorkerRole, int] | None = None,
) -> list[WorkerPlan]:
    """The workers of a pool: ``replicas.min`` per role unless ``replicas`` says."""
    counts = {
        role: (replicas or {}).get(role, _role(pool, role).replicas.min) for role in pool.roles()
    }
    total = sum(counts.values())
    if len(ports) < total:
        raise ValueError(f"need {total} ports, got {len(ports)}")
    cpus = cpu_sets(total, cores)
    out: list[WorkerPlan] = []
    for role, count in counts.items():
        for index in range(count):
            slot = len(out)
            out.append(WorkerPlan(role, f"{role}-{index}", ports[slot], cpus[slot]))
    return out


def _role(pool: api.InferencePool, role: WorkerRole) -> api.RoleSpec:
    return pool.spec.prefill if role == "prefill" else pool.spec.decode


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """PromQL's ``histogram_quantile`` over cumulative ``(le, count)`` buckets."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            fraction = (rank - lower_count) / width if width > 0 else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass(frozen=True)
class Snapshot:
    """What the status line shows."""

    ready: dict[str, int]
    total: dict[str, int]
    queue: float
    ttft: float | None
    tpot: float | None
    requests: float

    def line(self, percentile: float) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else api.format_duration(value)

        roles = " · ".join(f"{r} {self.ready[r]}/{self.total[r]}" for r in self.total)
        p = f"p{percentile:g}"
        return (
            f"{roles} · queue {self.queue:g} · TTFT {p} {ms(self.ttft)} · "
            f"TPOT {p} {ms(self.tpot)} · requests {self.requests:g}"
        )


def parse_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text → {sample name: [(labels, value)]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def router_latency(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, q: float
) -> float | None:
    buckets: dict[float, float] = {}
    for labels, value in samples.get(f"{name}_bucket", []):
        le = float(labels["le"])
        buckets[le] = buckets.get(le, 0.0) + value
    return histogram_quantile(list(buckets.items()), q)


# ---------------------------------------------------------------------------
# I/O: workers


class Worker(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    async def wait_ready(self, startup_timeout_s: float | None = None) -> None: ...

    async def stop(self) -> int | None: ...


class EmulatorWorker:
    """An engine emulator child process (``python -m tandem.workers.emulator``)."""

    def __init__(self, argv: list[str], port: int, run_dir: Path, name: str) -> None:
        self._argv = argv
        self._port = port
        self._run_dir = run_dir
        self._name = name
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        self._run_dir.mkdir(parents=True, exist_ok=True)
        log = (self._run_dir / "worker.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tandem.workers.emulator", *self._argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self._run_dir,
            )
        finally:
            log.close()

    async def wait_ready(self, startup_timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (startup_timeout_s or 60.0)
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    log = (self._run_dir / "worker.log").read_text(errors="replace")[-2000:]
                    raise LocalModeError(f"emulator {self._name} exited:\n{log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "/health")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise LocalModeError(f"emulator {self._name} did not become healthy in time")

    async def stop(self) -> int | None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        for _ in range(100):
            if proc.poll() is not None:
                return proc.returncode
            await asyncio.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return await asyncio.to_thread(proc.wait)


@dataclass(frozen=True)
class LocalSettings:
    """How ``tandem up`` runs a pool."""

    engine: Engine = "vllm"
    host: str = "127.0.0.1"
    port: int = 8000
    run_dir: Path = Path(".tandem/run")
    """Worker logs, caches and temp files; the tiny model is cached beside it."""
    cores: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    startup_timeout_s: float = 600.0


def resolve_model(pool: api.InferencePool, settings: LocalSettings) -> str:
    """A local directory with the weights: the pool's own, or the tiny model built here."""
    model = pool.spec.model
    for candidate in (model.path, model.name):
        if candidate and Path(candidate).is_dir():
            return str(Path(candidate).absolute())
    if model.name.startswith(TINY_MODEL_PREFIX):
        from tandem.workers import tinymodel

        return str(tinymodel.cached_tiny_model(settings.run_dir.parent / "models").absolute())
    raise LocalModeError(
        f"spec.model: {model.path or model.name!r} is not a local directory and local mode never "
        "downloads weights: point spec.model.path at a local copy, name a model "
        f"'{TINY_MODEL_PREFIX}-…' to have one built, or use --engine emulator"
    )


def build_worker(
    pool: api.InferencePool, plan: WorkerPlan, settings: LocalSettings, model: str | None
) -> Worker:
    run_dir = settings.run_dir / plan.name
    args = planning.engine_args(pool, plan.role)
    if settings.engine == "emulator":
        role = plan.role if pool.spec.mode != "aggregated" else "both"
        argv = ["--port", str(plan.port), "--role", role,
                "--served-model-name", args.served_name, "--log-level", "warning"]  # fmt: skip
        if args.max_num_seqs:
            argv += ["--max-num-seqs", str(args.max_num_seqs)]
        if args.max_num_batched_tokens:
            argv += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        if args.max_model_len:
            argv += ["--max-model-len", str(args.max_model_len)]
        return EmulatorWorker(argv, plan.port, run_dir, plan.name)
    from tandem.workers import launcher

    assert model is not None
    engine = dataclasses.replace(
        args,
        model=model,
        host="127.0.0.1",
        port=plan.port,
        # CPU workers: eager mode starts ~26 s sooner; KV staged in host memory.
        enforce_eager=True,
        kv_buffer_device="cpu",
    )
    return launcher.WorkerProcess(
        launcher.WorkerSettings(
            name=plan.name,
            role=planning.engine_role(pool, plan.role),
            engine=engine,
            run_dir=run_dir,
            cpus=plan.cpus,
            startup_timeout_s=settings.startup_timeout_s,
        )
    )


def _free_ports(count: int) -> list[int]:
    import socket

    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class LocalPool:
    """A running local pool: its router URL and workers by role."""

    pool: api.InferencePool
    url: str
    workers: dict[str, list[Worker]]
    set_endpoints: Callable[[WorkerRole, Sequence[str]], None]
    """Replace one role's workers in the router (the autoscaler calls it)."""
    spawn: Callable[[WorkerRole, int], Worker] | None = None
    """Builds (does not start) the ``index``-th worker of a role, on a free port."""

    async def snapshot(self, client: httpx.AsyncClient) -> Snapshot:
        q = self.pool.spec.slo.percentile / 100
        total = {role: len(ws) for role, ws in self.workers.items()}
        ready = dict.fromkeys(total, 0)
        queue = 0.0
        for role, workers in self.workers.items():
            for worker in workers:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = await client.get(worker.url + "/metrics")
                    if response.status_code == 200:
                        ready[role] += 1
                        samples = parse_samples(response.text)
                        queue += sum(v for _, v in samples.get("vllm:num_requests_waiting", []))
        samples = {}
        with contextlib.suppress(httpx.HTTPError, ValueError):
            samples = parse_samples((await client.get(self.url + "/metrics")).text)
        requests = sum(v for _, v in samples.get("tandem_router_requests_total", []))
        return Snapshot(
            ready=ready,
            total=total,
            queue=queue,
            ttft=router_latency(samples, "tandem_router_ttft_seconds", q),
            tpot=router_latency(samples, "tandem_router_tpot_seconds", q),
            requests=requests,
        )


@contextlib.asynccontextmanager
async def running(pool: api.InferencePool, settings: LocalSettings) -> AsyncIterator[LocalPool]:
    """Start the pool's workers and router; stop and reap everything on exit."""
    from tandem.router import server
    from tandem.router import settings as router_settings

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(pool, settings) if settings.engine == "vllm" else None
    count = sum(_role(pool, r).replicas.min for r in pool.roles())
    plans = plan_workers(pool, _free_ports(count), settings.cores)
    workers: dict[str, list[Worker]] = {role: [] for role in pool.roles()}
    for plan in plans:
        workers[plan.role].append(build_worker(pool, plan, settings, model))
    every = [w for ws in workers.values() for w in ws]
    try:
        for worker in every:
            worker.start()
        await asyncio.gather(*(w.wait_ready(settings.startup_timeout_s) for w in every))
        config = router_settings.static_settings(
            pool.spec.model.effective_served_name,
            prefill=[w.url for w in workers.get("prefill", [])],
            decode=[w.url for w in workers["decode"]],
            mode=pool.spec.mode,
            policy=pool.spec.router.policy,
            autoThresholdTokens=pool.spec.router.auto_threshold_tokens,
            maxQueuedRequests=pool.spec.router.max_queued_requests,
            poolName=pool.name,
        )

        def spawn(role: WorkerRole, index: int) -> Worker:
            [port] = _free_ports(1)
            cpus = cpu_sets(index + 1, settings.cores)[index] if settings.cores else None
            plan = WorkerPlan(role, f"{role}-{index}", port, cpus)
            return build_worker(pool, plan, settings, model)

        async with server.serving(config, host=settings.host, port=settings.port) as (url, app):
            yield LocalPool(pool, url, workers, app.set_endpoints, spawn)
    finally:
        # Every worker: those started here, and any an autoscaler added since.
        current = [w for ws in workers.values() for w in ws if w not in every]
        await asyncio.gather(*(w.stop() for w in [*every, *current]), return_exceptions=True)


# ---------------------------------------------------------------------------
# The demo request and the command


async def demo(url: str, served_name: str, out: object = None, max_tokens: int = 24) -> str:
    """Stream one chat completion through the router, echoing it as it arrives."""
    write = sys.stdout.write if out is None else out.write  # type: ignore[attr-defined]
    body = {
        "model": served_name,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text = []
    async with (
        httpx.AsyncClient(timeout=120.0) as client,
        client.stream("POST", url + "/v1/chat/completions", json=body) as response,
    ):
        if response.status_code != 200:
            raise LocalModeError(
                f"demo request failed: {response.status_code} {await response.aread()!r}"
            )
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise LocalModeError(f"demo stream ended with an error: {event['error']}")
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content") or ""
                text.append(piece)
                write(piece)
    write("\n")
    return "".join(text)


async def kv_evidence(pool: LocalPool) -> str:
    """What the decode workers' metrics say about KV that came over NIXL."""
    external = nixl_bytes = 0.0
    async with httpx.AsyncClient(timeout=5.0) as client:
        for worker in pool.workers["decode"]:
            with contextlib.suppress(httpx.HTTPError):
                samples = parse_samples((await client.get(worker.url + "/metrics")).text)
                external += sum(
                    v
                    for labels, v in samples.get("vllm:prompt_tokens_by_source_total", [])
                    if labels.get("source") == "external_kv_transfer"
                )
                nixl_bytes += sum(v for _, v in samples.get("vllm:nixl_bytes_transferred_sum", []))
    return f"decode workers: {external:g} prompt tokens arrived as KV from prefill, {nixl_bytes:g} bytes over NIXL"


async def _serve(
    pool_spec: api.InferencePool, settings: LocalSettings, args: argparse.Namespace
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"tandem up: {pool_spec.name} ({pool_spec.spec.mode}, engine {settings.engine}) — starting "
          f"{' and '.join(pool_spec.roles())} workers, logs in {settings.run_dir}/", flush=True)  # fmt: skip
    started = time.monotonic()
    async with running(pool_spec, settings) as pool, _autoscaling(pool, settings, args):
        served = pool_spec.spec.model.effective_served_name
        print(
            f"ready in {time.monotonic() - started:.0f}s: {pool.url}/v1 (model {served!r})",
            flush=True,
        )
        if not args.no_demo:
            print(
                f"demo: a streamed chat completion through the router ({pool_spec.spec.mode}):",
                flush=True,
            )
            await demo(pool.url, served)
            if pool_spec.spec.mode != "aggregated":
                print(await kv_evidence(pool), flush=True)
        if args.exit_after_demo:
            return 0
        print(f"try: curl -N {pool.url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{served}\", \"prompt\": \"Hello\", \"max_tokens\": 16, \"stream\": true}}'")  # fmt: skip
        print("Ctrl-C stops everything.", flush=True)
        tty = sys.stdout.isatty()
        async with httpx.AsyncClient(timeout=2.0) as client:
            while not stop.is_set():
                snap = await pool.snapshot(client)
                line = snap.line(pool_spec.spec.slo.percentile)
                print(
                    ("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", flush=True
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=args.status_interval)
        print("\nstopping…", flush=True)
    print("stopped", flush=True)
    return 0


@contextlib.asynccontextmanager
async def _autoscaling(
    pool: LocalPool, settings: LocalSettings, args: argparse.Namespace
) -> AsyncIterator[None]:
    """With ``--autoscale``: the planner sizes the roles while the pool runs."""
    if not args.autoscale or pool.spawn is None:
        yield
        return
    from tandem import local_scaling

    tty = sys.stdout.isatty()

    def out(line: str) -> None:
        print(("\r\x1b[K" if tty else "") + line, flush=True)

    scaler = local_scaling.LocalAutoscaler(
        pool, pool.spawn, out, startup_timeout_s=settings.startup_timeout_s
    )
    a = pool.pool.spec.autoscaling
    out(f"autoscale: policy {a.policy}, every {a.interval}, signals from the workers' /metrics "
        f"(window {a.window}, warm-up {a.warmup})")  # fmt: skip
    done = asyncio.Event()
    task = asyncio.create_task(scaler.run(done), name="autoscale")
    try:
        yield
    finally:
        done.set()
        await task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem up", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="an InferencePool manifest (e.g. examples/tiny.yaml)")
    parser.add_argument("--engine", choices=["vllm", "emulator"], default="vllm",
                        help="real vLLM on the CPU (default) or the engine emulator")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="router port (0: any free port)")
    parser.add_argument("--run-dir", type=Path, default=Path(".tandem/run"))
    parser.add_argument("--pool", help="which pool of a file holding several")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo request")
    parser.add_argument("--exit-after-demo", action="store_true",
                        help="stop after the demo request (smoke test)")  # fmt: skip
    parser.add_argument("--autoscale", action="store_true",
                        help="size the prefill and decode pools with the planner, between "
                        "replicas.min and max, from the workers' own metrics")  # fmt: skip
    parser.add_argument("--status-interval", type=float, default=2.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        pools = validation.load_pools(Path(args.file))
    except validation.InvalidPoolError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc}", file=sys.stderr)
        return 1
    chosen = [p for p in pools if args.pool in (None, p.name)]
    if not chosen:
        print(f"{args.file}: no pool named {args.pool!r}", file=sys.stderr)
        return 1
    settings = LocalSettings(
        engine=args.engine,
        host=args.host,
        port=args.port,
        run_dir=args.run_dir,
        startup_timeout_s=args.startup_timeout,
    )
    try:
        return asyncio.run(_serve(chosen[0], settings, args))
    except LocalModeError as exc:
        print(f"tandem up: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from tandem.workers import launcher

        if not isinstance(exc, launcher.WorkerError):
            raise
        print(f"tandem up: {exc}", file=sys.stderr)
        return 1

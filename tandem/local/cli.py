"""``tandem up FILE``: run a pool on this machine.

The router runs in this process (uvicorn in our event loop); prefill and decode
workers are child processes: real vLLM on the CPU (the default, with the tiny
model built on the spot when the pool names ``tandem/tiny-*``) or the engine
emulator (``--engine emulator``). The same pure pieces as in a cluster decide
the workers' arguments (:func:`tandem.operator.planning.engine_args`) and, with
``--autoscale``, their number (:mod:`tandem.autoscaling.planner`).

Ctrl-C stops the router first (no new requests), then every worker, and reaps
them; nothing is left behind outside the run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tandem.local import demo, planning, processes, progress, scaling, status, supervision
from tandem.operator import api, validation
from tandem.workers import launcher

_DESCRIPTION = "Run a pool on this machine: router, prefill and decode workers."


async def _serve(
    pool_spec: api.InferencePool, settings: planning.LocalSettings, args: argparse.Namespace
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"tandem up: {pool_spec.name} ({pool_spec.spec.mode}, engine {settings.engine}) — starting "
          f"{' and '.join(pool_spec.roles())} workers, logs in {settings.run_dir}/", flush=True)  # fmt: skip
    started = time.monotonic()
    tty = sys.stdout.isatty()
    shown = progress.Progress(out=lambda text: print(text, flush=True), tty=tty)
    async with (
        processes.running(pool_spec, settings, shown) as pool,
        _supervised(pool, settings),
        _autoscaling(pool, settings, args),
    ):
        served = pool_spec.spec.model.effective_served_name
        print(
            f"ready in {time.monotonic() - started:.0f}s: {pool.url}/v1 (model {served!r})",
            flush=True,
        )
        if not args.no_demo:
            await _demo(pool_spec, pool, settings)
        if args.exit_after_demo:
            return 0
        print(f"try: curl -N {pool.url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{served}\", \"prompt\": \"Hello\", \"max_tokens\": 16, \"stream\": true}}'")  # fmt: skip
        print("Ctrl-C stops everything.", flush=True)
        tty = sys.stdout.isatty()
        async with httpx.AsyncClient(timeout=2.0) as client:
            while not stop.is_set():
                snap = await status.read(pool, client)
                line = snap.line(pool_spec.spec.slo.percentile)
                print(
                    ("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", flush=True
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=args.status_interval)
        print("\nstopping…", flush=True)
    print("stopped", flush=True)
    return 0


async def _demo(
    pool_spec: api.InferencePool, pool: processes.LocalPool, settings: planning.LocalSettings
) -> None:
    """Stream the demo through the router; check it against one worker's own answer."""
    mode, served = pool_spec.spec.mode, pool_spec.spec.model.effective_served_name
    emulated = settings.engine == "emulator"
    print(f"demo: a streamed greedy chat completion through the router ({mode}):", flush=True)
    answer = await demo.demo(pool.url, served)
    if emulated:
        print("  (the engine emulator makes up its tokens: the text means nothing)", flush=True)
    elif pool_spec.spec.model.name.startswith(planning.TINY_MODEL_PREFIX):
        print("  (the tiny model has random weights: its text is noise by design)", flush=True)
    if mode != "aggregated":
        if not emulated:
            single = await demo.reference(pool.workers["decode"][0].url, served)
            print(demo.verdict(answer, single), flush=True)
        print(await demo.kv_evidence(pool, emulated=emulated), flush=True)


@contextlib.asynccontextmanager
async def _supervised(
    pool: processes.LocalPool, settings: planning.LocalSettings
) -> AsyncIterator[None]:
    """A worker that dies is restarted, as a kubelet would (tandem.local.supervision)."""
    if pool.spawn is None:
        yield
        return
    tty = sys.stdout.isatty()

    def out(line: str) -> None:
        print(("\r\x1b[K" if tty else "") + line, flush=True)

    supervisor = supervision.Supervisor(pool, out, startup_timeout_s=settings.startup_timeout_s)
    done = asyncio.Event()
    task = asyncio.create_task(supervisor.run(done), name="supervise")
    try:
        yield
    finally:
        done.set()
        await task


@contextlib.asynccontextmanager
async def _autoscaling(
    pool: processes.LocalPool, settings: planning.LocalSettings, args: argparse.Namespace
) -> AsyncIterator[None]:
    """With ``--autoscale``: the planner sizes the roles while the pool runs."""
    if not args.autoscale or pool.spawn is None:
        yield
        return
    tty = sys.stdout.isatty()

    def out(line: str) -> None:
        print(("\r\x1b[K" if tty else "") + line, flush=True)

    scaler = scaling.LocalAutoscaler(
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
    parser = argparse.ArgumentParser(prog="tandem up", description=_DESCRIPTION)
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
    settings = planning.LocalSettings(
        engine=args.engine,
        host=args.host,
        port=args.port,
        run_dir=args.run_dir,
        startup_timeout_s=args.startup_timeout,
    )
    try:
        return asyncio.run(_serve(chosen[0], settings, args))
    except planning.LocalModeError as exc:
        print(f"tandem up: {exc}", file=sys.stderr)
        return 1
    except launcher.WorkerError as exc:
        print(f"tandem up: {exc}", file=sys.stderr)
        return 1

"""Router overhead: Tandem's router against vLLM's Rust router, same backends, same run.

Starts on 127.0.0.1 only, each in its own process (stopped by PID at the end):
a prefill and a decode engine emulator (``python -m tandem.workers.emulator``,
sped up so their service time is near zero), Tandem's router (``tandem router``,
P/D mode) and ``vllm-router --vllm-pd-disaggregation`` over the same two
emulators. Then, from this process, with a minimal HTTP/1.1 client:

1. latency: one request at a time, the three paths interleaved (direct = the
   client does both hops itself: prefill with ``max_tokens=1`` and
   ``kv_transfer_params``, then decode with the returned params). Added latency
   is a router's percentile minus the direct path's.
2. throughput: a closed loop at several concurrencies for a fixed time per path;
   the highest completed-request rate is reported.

Every request is a streamed completion (``max_tokens`` tokens), timed to its last
byte. Bounded: ``--requests`` latency samples per path, ``--seconds`` per
throughput point. Usage::

    .venv/bin/python benchmarks/router_overhead.py [--requests 400] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MODEL = "bench"
HOST = "127.0.0.1"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
PREFILL_KV = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------------
# Processes


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


@contextlib.contextmanager
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


def start(started: list[Process], name: str, argv: list[str], log: Path) -> Process:
    out = log.open("wb")
    process = Process(name, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT), log)
    started.append(process)
    return process


async def wait_ready(process: Process, port: int, path: str, within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            tail = process.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{tail}")
        try:
            conn = await Connection.open(port)
            try:
                status, _ = await conn.request(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            finally:
                conn.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{process.name} not ready after {within:g}s")


# ---------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client: the load generator must cost less than
# what it measures.


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        index = lower.find(b"content-length:")
        if index >= 0:
            end = lower.index(b"\r\n", index)
            return status, await reader.readexactly(int(lower[index + 15 : end]))
        parts: list[bytes] = []
        while True:  # chunked
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])


def post(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


Call = Callable[[], Awaitable[None]]


class Paths:
    """The three ways to serve one request; each call uses its own connections."""

    def __init__(
        self, prefill: list[int], decode: list[int], tandem: int, vllm_router: int, tokens: int
    ):
        self.prefill = prefill
        self.decode = decode
        self.turn = 0
        self.ports = {"tandem": tandem, "vllm-router": vllm_router}
        self.request = {"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "stream": True}
        self.raw = post("/v1/completions", json.dumps(self.request).encode())
        prefill_body = {
            **self.request,
            "max_tokens": 1,
            "stream": False,
            "kv_transfer_params": PREFILL_KV,
        }
        self.prefill_raw = post("/v1/completions", json.dumps(prefill_body).encode())
        self.tokens = tokens
        self.opened: list[Connection] = []

    def close_all(self) -> None:
        for conn in self.opened:
            conn.close()
        self.opened.clear()

    async def client(self, name: str) -> Call:
        """A coroutine function serving one request on the named path."""
        if name == "direct":  # each client sticks to one prefill and one decode worker
            self.turn += 1
            p = await Connection.open(self.prefill[self.turn % len(self.prefill)])
            d = await Connection.open(self.decode[self.turn % len(self.decode)])
            self.opened += [p, d]

            async def direct() -> None:
                status, body = await p.request(self.prefill_raw)
                check(status, body)
                params = json.loads(body)["kv_transfer_params"]
                decode = json.dumps({**self.request, "kv_transfer_params": params}).encode()
                status, body = await d.request(post("/v1/completions", decode))
                check(status, body, self.tokens)

            return direct
        conn = await Connection.open(self.ports[name])
        self.opened.append(conn)

        async def routed() -> None:
            status, body = await conn.request(self.raw)
            check(status, body, self.tokens)

        return routed


def check(status: int, body: bytes, tokens: int | None = None) -> None:
    if status != 200:
        raise RuntimeError(f"status {status}: {body[:200]!r}")
    if tokens is not None and body.count(b"data: ") != tokens + 1:
        raise RuntimeError(f"expected {tokens} events and [DONE], got {body[:300]!r}")


# ---------------------------------------------------------------------------
# Measurements


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(paths: Paths, names: list[str], n: int, warmup: int) -> dict[str, list[float]]:
    calls = {name: await paths.client(name) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + n):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
        for name in order:
            started = time.perf_counter()
            await calls[name]()
            if i >= warmup:
                samples[name].append(time.perf_counter() - started)
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(
    paths: Paths, name: str, concurrency: int, seconds: float, pid: int | None = None
) -> tuple[float, float | None]:
    """Completed requests per second, and the router's CPU µs per request."""
    calls = [await paths.client(name) for _ in range(concurrency)]
    done = 0
    stop_at = 0.0

    async def loop(call: Call) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    for call in calls[: min(concurrency, 8)]:  # warm every path
        await call()
    done = 0
    cpu_before = cpu_seconds(pid) if pid else 0.0
    stop_at = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(*(loop(call) for call in calls))
    rate = done / (time.perf_counter() - started)
    paths.close_all()
    cpu = (cpu_seconds(pid) - cpu_before) / done * 1e6 if pid and done else None
    return rate, cpu


# ---------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, object]:
    vllm_router = shutil.which(
        "vllm-router", path=str(Path(sys.executable).parent)
    ) or shutil.which("vllm-router")
    logs = Path(tempfile.mkdtemp(prefix="tandem-router-bench-"))
    ports = {name: free_port() for name in ("tandem", "vllm-router", "vr-metrics")}
    workers = {role: [free_port() for _ in range(args.workers)] for role in ("prefill", "decode")}
    urls = {role: [f"http://{HOST}:{port}" for port in found] for role, found in workers.items()}
    config = {
        "servedModelName": MODEL,
        "mode": "disaggregated",
        "policy": "least-load",
        "discovery": {
            "kind": "static",
            "prefill": urls["prefill"],
            "decode": urls["decode"],
        },
        "maxQueuedRequests": 4096,
    }
    (logs / "router.json").write_text(json.dumps(config))
    emulator = [sys.executable, "-m", "tandem.workers.emulator", "--served-model-name", MODEL,
                "--time-scale", str(args.time_scale), "--log-level", "warning", "--host", HOST]  # fmt: skip
    with processes() as started:
        waits = []
        for role, found in workers.items():
            for i, port in enumerate(found):
                argv = [*emulator, "--role", role, "--port", str(port)]
                name = f"{role}-{i}"
                waits.append((start(started, name, argv, logs / f"{name}.log"), port, "/health"))
        pin = ["taskset", "-c", args.router_cpus] if args.router_cpus else []
        argv = [*pin, sys.executable, "-m", "tandem.router", "--config", str(logs / "router.json"),
                "--host", HOST, "--port", str(ports["tandem"]), "--log-level", "warning"]  # fmt: skip
        waits.append(
            (start(started, "tandem", argv, logs / "tandem.log"), ports["tandem"], "/ready")
        )
        names = ["direct", "tandem"]
        if vllm_router and not args.no_vllm_router:
            argv = [*pin, vllm_router, "--vllm-pd-disaggregation",
                    *(a for url in urls["prefill"] for a in ("--prefill", url)),
                    *(a for url in urls["decode"] for a in ("--decode", url)),
                    "--policy", "round_robin", "--host", HOST, "--port", str(ports["vllm-router"]),
                    "--prometheus-host", HOST, "--prometheus-port", str(ports["vr-metrics"]),
                    "--worker-startup-check-interval", "1", "--log-level", "warning",
                    "--queue-size", "4096"]  # fmt: skip
            waits.append(
                (
                    start(started, "vllm-router", argv, logs / "vllm-router.log"),
                    ports["vllm-router"],
                    "/health",
                )
            )
            names.append("vllm-router")
        else:
            print(
                "vllm-router not found (pip install vllm-router): measuring Tandem only",
                file=sys.stderr,
            )
        for process, port, path in waits:
            await wait_ready(process, port, path)
        paths = Paths(
            workers["prefill"],
            workers["decode"],
            ports["tandem"],
            ports["vllm-router"],
            args.tokens,
        )

        print(f"latency: {args.requests} sequential requests per path ...", file=sys.stderr)
        samples = await latency(paths, names, args.requests, args.warmup)
        result: dict[str, object] = {"tokens": args.tokens, "requests": args.requests}
        lat: dict[str, dict[str, float]] = {}
        for name in names:
            values = samples[name]
            lat[name] = {
                "p50_ms": 1e3 * statistics.median(values),
                "p99_ms": 1e3 * pct(values, 0.99),
            }
        for name in names[1:]:
            lat[name]["added_p50_ms"] = lat[name]["p50_ms"] - lat["direct"]["p50_ms"]
            lat[name]["added_p99_ms"] = lat[name]["p99_ms"] - lat["direct"]["p99_ms"]
        result["latency"] = lat

        # Short slices, the paths taking turns, so that load from outside this
        # benchmark (other processes on a shared machine) hits all paths alike.
        pids = {p.name: p.popen.pid for p in started}
        rates: dict[str, dict[int, float]] = {name: {} for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        slices = max(1, round(args.seconds / args.slice))
        for concurrency in args.concurrency:
            print(f"throughput at concurrency {concurrency} ...", file=sys.stderr)
            seen: dict[str, list[float]] = {name: [] for name in names}
            for i in range(slices):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    rate, own = await throughput(
                        paths, name, concurrency, args.slice, pids.get(name)
                    )
                    seen[name].append(rate)
                    if own is not None:
                        cpu[name].append(own)
            for name in names:
                rates[name][concurrency] = statistics.median(seen[name])
        result["throughput_rps"] = rates
        result["cpu_us_per_request"] = {n: statistics.median(v) for n, v in cpu.items() if v}
        result["max_rps"] = {name: max(r.values()) for name, r in rates.items()}
        if "vllm-router" in names:
            best = result["max_rps"]
            assert isinstance(best, dict)
            result["ratios"] = {
                "added_p50_tandem_over_vllm_router": lat["tandem"]["added_p50_ms"]
                / max(lat["vllm-router"]["added_p50_ms"], 1e-9),
                "max_rps_tandem_over_vllm_router": best["tandem"] / best["vllm-router"],
            }
        result["cpus"] = len(os.sched_getaffinity(0))
        result["workers_per_role"] = args.workers
        result["router_cpus"] = args.router_cpus
        result["load_average_at_end"] = os.getloadavg()
        result["logs"] = str(logs)
    return result


def report(result: dict[str, object]) -> str:
    lat = result["latency"]
    best = result["max_rps"]
    rates = result["throughput_rps"]
    cpu = result["cpu_us_per_request"]
    assert isinstance(lat, dict)
    assert isinstance(best, dict)
    assert isinstance(rates, dict)
    assert isinstance(cpu, dict)
    lines = [
        "| path | p50 ms | p99 ms | added p50 ms | added p99 ms | max req/s | req/s by concurrency "
        "| router CPU µs/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, values in lat.items():
        added = (
            f"{values['added_p50_ms']:.2f} | {values['added_p99_ms']:.2f}"
            if "added_p50_ms" in values
            else "— | —"
        )
        by = ", ".join(f"{c}: {r:.0f}" for c, r in rates[name].items())
        own = f"{cpu[name]:.0f}" if name in cpu else "—"
        lines.append(
            f"| {name} | {values['p50_ms']:.2f} | {values['p99_ms']:.2f} | {added} "
            f"| {best[name]:.0f} | {by} | {own} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="latency samples per path")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests per path first")
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="measured seconds per path and concurrency"
    )
    parser.add_argument(
        "--slice", type=float, default=1.0, help="seconds per turn (the paths alternate)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tokens", type=int, default=4, help="max_tokens of each request")
    parser.add_argument("--time-scale", type=float, default=1e6, help="emulator speed-up")
    parser.add_argument(
        "--workers", type=int, default=1, help="emulators per role (default: 1 prefill, 1 decode)"
    )
    parser.add_argument(
        "--router-cpus",
        help="taskset CPU list for both routers (e.g. 3): measure them on a core of their own",
    )
    parser.add_argument("--no-vllm-router", action="store_true", help="skip vllm-router")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON too")
    args = parser.parse_args(argv)
    print(f"load average (1, 5, 15 min) at the start: {os.getloadavg()}")
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(report(result))
    print(f"load average (1, 5, 15 min) at the end: {result['load_average_at_end']}")
    if "ratios" in result:
        print(json.dumps(result["ratios"], indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

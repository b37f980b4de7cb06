"""NIXL DRAM-to-DRAM READ throughput between two processes, next to a plain memcpy.

What a decode worker does with a prefill worker's KV cache on a CPU machine,
stripped to the transport: a *target* process registers a buffer with NIXL (UCX
backend) and hands its agent metadata and descriptors over a pipe; the
*initiator* (this process) registers its own buffer, prepares one READ of the
whole remote buffer (split into ``--chunks`` descriptors, as KV blocks are) and
posts it again and again, polling until ``DONE``. The same run times an
in-process copy of the same size (numpy, and torch when installed) as the
memory-bandwidth yardstick.

    .venv/bin/python benchmarks/nixl_transfer.py                  # 64 MiB, 30 repeats
    .venv/bin/python benchmarks/nixl_transfer.py --size-mib 256 --chunks 1 64 --json out.json

Needs the engine stack (scripts/install-engine.sh) for ``nixl`` and numpy.
Reports medians (and p10/p90) over the repeats; every READ's bytes are checked
once at the end against the pattern the target wrote.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

MIB = 1024 * 1024
SEED = 1234


@dataclass(frozen=True)
class Result:
    method: str
    size_bytes: int
    chunks: int
    repeats: int
    median_s: float
    p10_s: float
    p90_s: float

    @property
    def gb_per_s(self) -> float:
        return self.size_bytes / self.median_s / 1e9


def _pattern(size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.random.default_rng(SEED).integers(0, 256, size, dtype=np.uint8)


def _descs(addr: int, size: int, chunks: int) -> list[tuple[int, int, int]]:
    step = size // chunks
    return [(addr + i * step, step, 0) for i in range(chunks)]


def _summary(method: str, size: int, chunks: int, times: Sequence[float]) -> Result:
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=10) if len(ordered) > 1 else [ordered[0]] * 9
    return Result(method, size, chunks, len(ordered), statistics.median(ordered), q[0], q[-1])


def _target(conn: Connection, size: int, chunk_counts: Sequence[int]) -> None:
    """The remote side: owns the source bytes and only answers READs."""
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent("bench-target", nixl_agent_config(backends=["UCX"]))
    src = _pattern(size)
    addr = src.ctypes.data
    reg = agent.register_memory([(addr, size, 0, "")], "DRAM")
    serialized = {
        n: agent.get_serialized_descs(agent.get_xfer_descs(_descs(addr, size, n), "DRAM"))
        for n in chunk_counts
    }
    conn.send((agent.get_agent_metadata(), serialized))
    conn.recv()  # the initiator is done reading
    agent.deregister_memory(reg)
    conn.send("bye")


def _time_nixl(size: int, chunk_counts: Sequence[int], warmup: int, repeats: int) -> list[Result]:
    from nixl._api import nixl_agent, nixl_agent_config

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_target, args=(child, size, list(chunk_counts)), daemon=True)
    proc.start()
    results = []
    try:
        agent = nixl_agent("bench-initiator", nixl_agent_config(backends=["UCX"]))
        dst = np.zeros(size, dtype=np.uint8)
        reg = agent.register_memory([(dst.ctypes.data, size, 0, "")], "DRAM")
        metadata, serialized = parent.recv()
        remote = agent.add_remote_agent(metadata)
        expected = _pattern(size)
        for chunks in chunk_counts:
            local = agent.get_xfer_descs(_descs(dst.ctypes.data, size, chunks), "DRAM")
            handle = agent.initialize_xfer(
                "READ", local, agent.deserialize_descs(serialized[chunks]), remote
            )
            times = []
            for i in range(warmup + repeats):
                dst.fill(0)  # every READ must really move the bytes again
                start = time.perf_counter()
                state = agent.transfer(handle)
                while state == "PROC":
                    state = agent.check_xfer_state(handle)
                elapsed = time.perf_counter() - start
                if state != "DONE":
                    raise RuntimeError(f"NIXL READ ended in state {state}")
                if i >= warmup:
                    times.append(elapsed)
            if not np.array_equal(dst, expected):
                raise RuntimeError("NIXL READ returned the wrong bytes")
            backend = agent.query_xfer_backend(handle)
            agent.release_xfer_handle(handle)
            results.append(_summary(f"NIXL READ ({backend}, 2 processes)", size, chunks, times))
        agent.remove_remote_agent(remote)
        agent.deregister_memory(reg)
        parent.send("done")
        parent.recv()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return results


def _time_copy(
    name: str, copy: Callable[[], object], size: int, warmup: int, repeats: int
) -> Result:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        copy()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return _summary(name, size, 1, times)


def _time_copies(size: int, warmup: int, repeats: int) -> list[Result]:
    src = _pattern(size)
    dst = np.zeros(size, dtype=np.uint8)
    results = [
        _time_copy(
            "memcpy (numpy.copyto, 1 thread)",
            lambda: np.copyto(dst, src),
            size,
            warmup,
            repeats,
        )
    ]
    try:
        import torch
    except ImportError:
        return results
    tsrc, tdst = torch.from_numpy(src), torch.zeros(size, dtype=torch.uint8)
    threads = torch.get_num_threads()
    results.append(
        _time_copy(
            f"memcpy (torch copy_, {threads} threads)",
            lambda: tdst.copy_(tsrc),
            size,
            warmup,
            repeats,
        )
    )
    return results


def _table(results: Sequence[Result]) -> str:
    baseline = next(r for r in results if r.method.startswith("memcpy (numpy"))
    lines = [
        "| method | descriptors | median ms | p10-p90 ms | GB/s (median) | vs numpy memcpy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.chunks} | {r.median_s * 1e3:.2f} | "
            f"{r.p10_s * 1e3:.2f}-{r.p90_s * 1e3:.2f} | {r.gb_per_s:.2f} | "
            f"{r.gb_per_s / baseline.gb_per_s:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[1, 64],
        help="descriptors per READ (the buffer is split evenly); several values, several rows",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    if any(size % n for n in args.chunks):
        parser.error("--size-mib must split evenly into --chunks")

    results = _time_copies(size, args.warmup, args.repeats)
    results += _time_nixl(size, args.chunks, args.warmup, args.repeats)

    load = os.getloadavg()
    print(
        f"{args.size_mib} MiB, {args.repeats} repeats after {args.warmup} warm-up; "
        f"{os.cpu_count()} CPUs, load {load[0]:.1f}; Python {platform.python_version()}; "
        f"UCX_TLS={os.environ.get('UCX_TLS', '(default)')}"
    )
    print(_table(results))
    nixl_rows = [r for r in results if r.method.startswith("NIXL")]
    best = max(nixl_rows, key=lambda r: r.gb_per_s)
    numpy_row = results[0]
    print(
        f"\nratio NIXL READ / numpy memcpy (median throughput, {best.chunks} descriptors): "
        f"{best.gb_per_s / numpy_row.gb_per_s:.2f}"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) | {"gb_per_s": r.gb_per_s} for r in results], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

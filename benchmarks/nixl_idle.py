"""Idle CPU and two-hop latency of a real vLLM (CPU) prefill + decode pair, per
NIXL progress-thread setting (``TANDEM_NIXL_PROGRESS_THREAD``, workers/nixl_tuning.py).

For each mode in ``--modes`` (default ``busy`` = NIXL's own busy-polling progress
thread, then ``default`` = Tandem's plugin with its 1000 us poll timeout), this
starts a prefill and a decode worker with the launcher local mode uses (tiny
random-weight Llama, NixlConnector with ``kv_buffer_device: cpu``, prefill on core
0, decode on core 1, both in the caller's session, on 127.0.0.1), then:

1. one two-hop round (the NIXL handshake), then ``--settle-s`` of quiet;
2. idle CPU: CPU seconds of every process of each worker's process group
   (``/proc/<pid>/stat`` utime + stime) over ``--idle-s`` seconds of no requests,
   and the hottest thread of each process (``/proc/<pid>/task/*/stat``);
3. ``--rounds`` two-hop rounds (prefill with ``max_tokens: 1`` and
   ``do_remote_decode``, then decode with the returned ``kv_transfer_params``;
   16 greedy tokens, a ~200-token prompt) with random idle gaps of 0-``--gap-ms``;
   a decode slower than ``--stall-s`` counts as a stall; the prefill's log is
   searched for vLLM's expired-lease warnings.

The workers are stopped (their process groups reaped) before the next mode.
Usage::

    .venv/bin/python benchmarks/nixl_idle.py [--modes busy,default] [--idle-s 30] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tandem.workers import launcher, tinymodel, vllm_args
from tandem.workers.nixl_tuning import ENV

PROMPT = (
    "The router sends the prompt to a prefill worker, then the request to a decode worker. "
    "The decode worker pulls the key and value blocks from the prefill worker with NIXL. "
    "Prefill reads the whole prompt at once; decode makes one token per step. "
) * 3
LEASE_WARNINGS = ("Releasing expired KV blocks", "Potentially invalid KV blocks")
PLUGIN_LINE = "tandem: NIXL agent"
TICK = os.sysconf("SC_CLK_TCK")


def worker(root: Path, name: str, role: vllm_args.Role, model: Path, cpus: str, mode: str
           ) -> launcher.WorkerProcess:  # fmt: skip
    engine = vllm_args.EngineArgs(
        model=str(model), served_name="tiny", host="127.0.0.1", port=launcher.free_port(),
        max_model_len=512, max_num_seqs=8, dtype="float32", kv_buffer_device="cpu",
        enforce_eager=True,
    )  # fmt: skip
    env = {} if mode == "default" else {ENV: mode}
    settings = launcher.WorkerSettings(
        name=name, role=role, engine=engine, run_dir=root / name, cpus=cpus, env=env,
        startup_timeout_s=900.0,
    )  # fmt: skip
    return launcher.WorkerProcess(settings)


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 16,
            "ignore_eos": True, **extra}  # fmt: skip


def two_hops(
    client: httpx.Client, prefill: launcher.WorkerProcess, decode: launcher.WorkerProcess,
    prompt: str,
) -> tuple[float, float]:  # fmt: skip
    """Seconds of the prefill hop and of the decode hop."""
    t0 = time.perf_counter()
    first = client.post(prefill.url + "/v1/completions",
                        json=body(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True}))  # fmt: skip
    first.raise_for_status()
    t1 = time.perf_counter()
    second = client.post(decode.url + "/v1/completions",
                         json=body(prompt, kv_transfer_params=first.json()["kv_transfer_params"]))  # fmt: skip
    second.raise_for_status()
    return t1 - t0, time.perf_counter() - t1


def processes(pgid: int) -> dict[int, str]:
    """pid -> a short name, for every process of group ``pgid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5: pgrp
                continue
            found[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
        except (OSError, ValueError, IndexError):
            continue
    return found


def cpu_ticks(path: Path) -> int:
    fields = path.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def snapshot(pids: dict[int, str]) -> dict[int, tuple[int, dict[str, int]]]:
    """pid -> (process ticks, thread 'tid:name' -> ticks)."""
    out = {}
    for pid in pids:
        try:
            threads = {}
            for task in Path(f"/proc/{pid}/task").iterdir():
                name = (task / "comm").read_text().strip()
                threads[f"{task.name}:{name}"] = cpu_ticks(task / "stat")
            out[pid] = (cpu_ticks(Path(f"/proc/{pid}/stat")), threads)
        except OSError:
            continue
    return out


def idle_cpu(workers: list[launcher.WorkerProcess], seconds: float) -> list[dict[str, Any]]:
    groups = {w.settings.name: processes(w.pid or -1) for w in workers}
    before = {name: snapshot(pids) for name, pids in groups.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    after = {name: snapshot(pids) for name, pids in groups.items()}
    rows = []
    for name, pids in groups.items():
        for pid, comm in pids.items():
            if pid not in before[name] or pid not in after[name]:
                continue
            (p0, t_before), (p1, t_after) = before[name][pid], after[name][pid]
            hot = max(t_after, key=lambda t: t_after[t] - t_before.get(t, 0), default="")
            rows.append({
                "worker": name, "pid": pid, "process": comm,
                "cpu_s_per_s": (p1 - p0) / TICK / elapsed,
                "hottest_thread": hot.split(":", 1)[-1],
                "hottest_cpu_s_per_s": (t_after.get(hot, 0) - t_before.get(hot, 0)) / TICK / elapsed,
            })  # fmt: skip
    return rows


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_mode(mode: str, model: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    prefill = worker(root, "prefill", "prefill", model, "0", mode)
    decode = worker(root, "decode", "decode", model, "1", mode)
    started = time.monotonic()
    launcher.start_all_sync([prefill, decode])
    result: dict[str, Any] = {"mode": mode, "boot_s": time.monotonic() - started}
    try:
        with httpx.Client(timeout=120.0) as client:
            for attempt in range(3):  # the NIXL handshake; vLLM gives it 5 s
                try:
                    two_hops(client, prefill, decode, "Warm up the NIXL handshake, please.")
                    break
                except httpx.HTTPError:
                    if attempt == 2:
                        raise
                    time.sleep(2)
            time.sleep(args.settle_s)
            result["idle"] = idle_cpu([prefill, decode], args.idle_s)
            rng = random.Random(0)
            pre, dec, total = [], [], []
            for i in range(args.rounds):
                time.sleep(rng.uniform(0, args.gap_ms / 1000))
                p, d = two_hops(client, prefill, decode, f"Round {i}. {PROMPT}")
                pre.append(p)
                dec.append(d)
                total.append(p + d)
        log = prefill.log_path.read_text(errors="replace")
        result["rounds"] = {
            "n": len(total),
            "stalls": sum(d > args.stall_s for d in dec),
            "total_ms": {"p50": 1000 * statistics.median(total), "p90": 1000 * pct(total, 0.9),
                         "max": 1000 * max(total)},
            "prefill_ms_p50": 1000 * statistics.median(pre),
            "decode_ms_p50": 1000 * statistics.median(dec),
            "decode_ms_max": 1000 * max(dec),
        }  # fmt: skip
        result["lease_warnings"] = sum(log.count(w) for w in LEASE_WARNINGS)
        result["plugin_log_lines"] = {
            w.settings.name: w.log_path.read_text(errors="replace").count(PLUGIN_LINE)
            for w in (prefill, decode)
        }
    finally:
        launcher.stop_all_sync([prefill, decode])
    return result


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| mode | worker | process | idle CPU (s/s) | hottest thread (s/s) |",
             "|---|---|---|---:|---|"]  # fmt: skip
    for r in results:
        for row in sorted(r["idle"], key=lambda x: (x["worker"], -x["cpu_s_per_s"])):
            lines.append(f"| {r['mode']} | {row['worker']} | {row['process']} | "
                         f"{row['cpu_s_per_s']:.3f} | {row['hottest_thread']} "
                         f"({row['hottest_cpu_s_per_s']:.3f}) |")  # fmt: skip
    lines += ["", "| mode | pair idle CPU (s/s) | rounds | stalls | two-hop p50 / p90 / max ms |"
              " prefill p50 ms | decode p50 / max ms | lease warnings | plugin lines (P, D) |",
              "|---|---:|---:|---:|---|---:|---|---:|---|"]  # fmt: skip
    for r in results:
        rr, t = r["rounds"], r["rounds"]["total_ms"]
        pair = sum(row["cpu_s_per_s"] for row in r["idle"])
        plugin = r["plugin_log_lines"]
        lines.append(
            f"| {r['mode']} | {pair:.2f} | {rr['n']} | {rr['stalls']} | "
            f"{t['p50']:.0f} / {t['p90']:.0f} / {t['max']:.0f} | {rr['prefill_ms_p50']:.0f} | "
            f"{rr['decode_ms_p50']:.0f} / {rr['decode_ms_max']:.0f} | {r['lease_warnings']} | "
            f"{plugin['prefill']}, {plugin['decode']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="busy,default",
                        help=f"comma-separated {ENV} values; 'default' leaves it unset")  # fmt: skip
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--gap-ms", type=float, default=300.0)
    parser.add_argument("--stall-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nixl-idle-") as tmp:
        root = Path(tmp)
        model = tinymodel.cached_tiny_model(root / "models", seed=0)
        results = []
        for mode in args.modes.split(","):
            print(f"== {mode}", file=sys.stderr, flush=True)
            results.append(run_mode(mode, model, root / mode, args))
            print(json.dumps(results[-1], indent=1), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"load average at the end: {os.getloadavg()}")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many KV hand-overs in a row, with idle gaps: no decode waits for the KV lease.

The stall this guards against (DESIGN.md, "vLLM in pods"): on a few cores a decode
worker got almost no CPU for 10-30 s while the prefill engine spun waiting for the
decode's "done" notice and each worker's NIXL progress thread busy-polled a core;
the prefill's 30 s KV lease then expired, and the decode read blocks the prefill
had already freed. Two things fix it, and the session's workers
(``vllm_cluster``, started by the launcher local mode uses) have both, which the
first test checks: every worker process group stays in the caller's session (one
autogroup, so the kernel shares the CPU between threads, not sessions), and
Tandem's vLLM plugin (``tandem.workers.nixl_tuning``) gives NIXL's progress thread
a poll timeout instead of a busy loop.

Then 100 rounds of the router's two hops, each with its own prompt (a real
transfer every time) after a random idle gap of 0-300 ms: every decode must
answer well inside the lease, and the prefill must never log that it released
blocks on expiry or that a decode read blocks it no longer held.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from e2e.vllm.cluster import (
    Cluster,
    completion_body,
    prefill_then_decode,
    scrape,
    total,
    warm_up,
)
from tandem.workers import launcher, nixl_tuning

pytestmark = pytest.mark.vllm

ROUNDS = 100
GAP_S = (0.0, 0.3)
STALL_S = 5.0
"""A round (both hops) slower than this counts as a stall: far below vLLM's 30 s KV
lease (``kv_lease_duration`` in the connector's extra config), far above a healthy
round here (~0.1-1 s)."""
IDLE_SETTLE_S, IDLE_SAMPLE_S = 2.0, 5.0
IDLE_MAX_CORE = 0.3
"""Share of a core an idle worker process may use: far above the ~0.03 measured
with the plugin, far below the ~0.85 of a busy-polling progress thread."""
LEASE_WARNINGS = ("Releasing expired KV blocks", "Potentially invalid KV blocks")
PLUGIN_LINE = "tandem: NIXL agent"

PROMPT = (
    "The prefill worker keeps the key and value blocks until the decode worker has "
    "read them over NIXL and said so; a lease bounds the wait. "
) * 4
"""About 120 tokens plus the round's own prefix: one or two KV blocks per round."""


def _log_size(worker: launcher.WorkerProcess) -> int:
    return worker.log_path.stat().st_size


def _log_since(worker: launcher.WorkerProcess, offset: int) -> str:
    with worker.log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def pd(vllm_cluster: Cluster) -> Cluster:
    c = vllm_cluster
    if not warm_up(c.prefill, c.decode):
        pytest.fail(f"no P/D round succeeded; decode log:\n{c.decode.log_tail(60)}")
    return c


def test_workers_run_the_fixed_configuration(pd: Cluster) -> None:
    for worker in (pd.prefill, pd.decode):
        assert worker.pid is not None
        # The launcher's own group, the caller's session (not start_new_session).
        assert os.getpgid(worker.pid) == worker.pid
        assert os.getsid(worker.pid) == os.getsid(0), f"{worker.settings.name}: own session"
        setting = nixl_tuning.setting_from_env()
        if setting.mode == "busy":
            continue  # NIXL's default asked for on purpose: nothing to find in the log
        log = worker.log_path.read_text(errors="replace")
        assert PLUGIN_LINE in log, (
            f"{worker.settings.name}: the tandem_nixl_tuning vLLM plugin did not run "
            "(is the package installed with its entry points? `uv pip install -e .`)"
        )
        assert setting.describe() in log


def _group_cpu_ticks(pgid: int) -> dict[int, int]:
    """pid -> utime + stime (clock ticks) of every process in group ``pgid``."""
    ticks = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    return ticks


def test_idle_workers_do_not_spin(pd: Cluster) -> None:
    """With NIXL's busy-polling progress thread each idle worker burned ~0.85 of a
    core here (benchmarks/RESULTS.md); with the plugin ~0.03."""
    if nixl_tuning.setting_from_env().mode == "busy":
        pytest.skip(f"{nixl_tuning.ENV}=busy: NIXL's busy poll asked for")
    workers = (pd.prefill, pd.decode)
    time.sleep(IDLE_SETTLE_S)
    before = {w.settings.name: _group_cpu_ticks(w.pid or -1) for w in workers}
    t0 = time.monotonic()
    time.sleep(IDLE_SAMPLE_S)
    elapsed = time.monotonic() - t0
    after = {w.settings.name: _group_cpu_ticks(w.pid or -1) for w in workers}
    tick = os.sysconf("SC_CLK_TCK")
    busy = {
        f"{name} pid {pid}": round((ticks - before[name][pid]) / tick / elapsed, 2)
        for name, group in after.items()
        for pid, ticks in group.items()
        if pid in before[name]
    }
    assert busy, "no worker process found"
    hot = {proc: share for proc, share in busy.items() if share > IDLE_MAX_CORE}
    assert not hot, f"idle worker processes using more than {IDLE_MAX_CORE} of a core: {hot}"


def test_hundred_handovers_without_a_stall(pd: Cluster) -> None:
    rng = random.Random(20261130)
    prefill_log, decode_before = _log_size(pd.prefill), scrape(pd.decode)
    round_s: list[float] = []
    prompt_tokens: list[int] = []
    started = time.monotonic()
    for i in range(ROUNDS):
        time.sleep(rng.uniform(*GAP_S))
        body = completion_body(f"Round {i} of {ROUNDS}. {PROMPT}")
        t0 = time.monotonic()
        prefilled, response = prefill_then_decode(pd.prefill, pd.decode, "/v1/completions", body)
        round_s.append(time.monotonic() - t0)
        assert response.status_code == 200, f"round {i}: {response.text}"
        assert prefilled["kv_transfer_params"]["remote_block_ids"], f"round {i}: no blocks"
        prompt_tokens.append(response.json()["usage"]["prompt_tokens"])
    elapsed = time.monotonic() - started

    stalls = [(i, round(s, 1)) for i, s in enumerate(round_s) if s > STALL_S]
    ordered = sorted(round_s)
    summary = (
        f"{ROUNDS} rounds in {elapsed:.0f} s; two hops p50 {ordered[len(ordered) // 2]:.2f} s, "
        f"max {ordered[-1]:.2f} s; load average {os.getloadavg()[0]:.1f}"
    )
    print(summary)
    assert not stalls, f"{len(stalls)} rounds over {STALL_S} s (round, s): {stalls}; {summary}"

    log = _log_since(pd.prefill, prefill_log)
    found = [w for w in LEASE_WARNINGS if w in log]
    assert not found, f"the prefill logged {found}; {summary}"

    # Every round pulled its prompt's KV over NIXL (all but at most the last token,
    # as in test_pd_nixl.py), and none failed. vLLM publishes the counters a little
    # after the response: scrape until they have caught up.
    expected = sum(n - 1 for n in prompt_tokens)
    failed, pulled = "vllm:nixl_num_failed_transfers_total", "vllm:prompt_tokens_by_source_total"
    external = {"source": "external_kv_transfer"}
    deadline = time.monotonic() + 30.0
    while True:
        after = scrape(pd.decode)
        tokens = total(after, pulled, **external) - total(decode_before, pulled, **external)
        if tokens >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert total(after, failed) == total(decode_before, failed)
    assert tokens >= expected, f"{tokens} prompt tokens came over NIXL, {expected} expected"

"""tandem up --autoscale: scrapes → planner inputs (pure), and the scaler's ordering."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tandem.autoscaling import planner, scrape
from tandem.local import processes, scaling
from tandem.operator import api

S = scrape


def scrape(t: float, text: str) -> S.Scrape:
    return S.Scrape(t, S.parse(text))


def prefill_text(waiting: float, ttft: dict[float, float], success: float, prompt: float) -> str:
    lines = [
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{engine="0"}} {waiting}',
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ]
    for le, count in ttft.items():
        bound = "+Inf" if le == float("inf") else f"{le}"
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{bound}"}} {count}')
    lines += [
        f'vllm:time_to_first_token_seconds_count{{engine="0"}} {max(ttft.values())}',
        "vllm:time_to_first_token_seconds_sum 1",
        "# TYPE vllm:request_success counter",
        f'vllm:request_success_total{{engine="0",finished_reason="length"}} {success}',
        "# TYPE vllm:prompt_tokens counter",
        f'vllm:prompt_tokens_total{{engine="0"}} {prompt}',
    ]
    return "\n".join(lines) + "\n"


def decode_text(waiting: float, kv: float, itl: dict[float, float]) -> str:
    lines = [
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{engine="0"}} {waiting}',
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f'vllm:kv_cache_usage_perc{{engine="0"}} {kv}',
        "# TYPE vllm:inter_token_latency_seconds histogram",
    ]
    for le, count in itl.items():
        bound = "+Inf" if le == float("inf") else f"{le}"
        lines.append(f'vllm:inter_token_latency_seconds_bucket{{engine="0",le="{bound}"}} {count}')
    lines.append(f'vllm:inter_token_latency_seconds_count{{engine="0"}} {max(itl.values())}')
    lines.append("vllm:inter_token_latency_seconds_sum 1")
    return "\n".join(lines) + "\n"


INF = float("inf")


def test_prefill_signals_come_from_deltas_between_two_scrapes() -> None:
    old = scrape(100, prefill_text(0, {0.1: 50, 0.5: 50, INF: 50}, 50, 50_000))
    # 10 new requests in 10 s, all between 0.1 s and 0.5 s: p90 interpolates in that bucket.
    new = scrape(110, prefill_text(3, {0.1: 50, 0.5: 60, INF: 60}, 60, 70_000))
    inputs = S.role_inputs(
        "prefill", [S.WorkerView(0, new, old)], replicas=1, now=110, warmup=30, percentile=90
    )
    assert inputs.replicas == inputs.ready == 1
    assert inputs.warming == 0
    m = inputs.metrics
    assert isinstance(m, planner.RoleMetrics)
    assert m.queue_depth == 3
    assert m.ttft == pytest.approx(0.1 + 0.4 * 0.9)  # as PromQL's histogram_quantile
    assert m.request_rate == pytest.approx(1.0)
    assert m.prompt_token_rate == pytest.approx(2000.0)
    assert m.kv_usage is None
    assert m.tpot is None


def test_decode_signals_and_the_router_queue() -> None:
    a_old = scrape(0, decode_text(0, 0.5, {0.01: 0, 0.05: 0, INF: 0}))
    a_new = scrape(10, decode_text(2, 0.9, {0.01: 0, 0.05: 100, INF: 100}))
    b_new = scrape(10, decode_text(1, 0.5, {0.01: 100, 0.05: 100, INF: 100}))
    router = S.parse("# TYPE tandem_router_queued_requests gauge\n"
                                 'tandem_router_queued_requests{pool="p"} 4\n')  # fmt: skip
    inputs = S.role_inputs(
        "decode", [S.WorkerView(0, a_new, a_old), S.WorkerView(0, b_new, None)],
        replicas=2, now=10, warmup=5, percentile=50, router=router,
    )  # fmt: skip
    m = inputs.metrics
    assert isinstance(m, planner.RoleMetrics)
    assert m.queue_depth == 2 + 1 + 4
    assert m.kv_usage == pytest.approx(0.7)
    # Only worker a has two scrapes: its 100 tokens all fell in (0.01, 0.05].
    assert m.tpot == pytest.approx(0.01 + 0.04 * 0.5)


def test_warming_workers_are_capacity_and_load_but_not_latency_or_queue() -> None:
    hot = scrape(10, decode_text(9, 1.0, {0.05: 10, INF: 10}))
    calm = scrape(10, decode_text(0, 0.2, {0.05: 10, INF: 10}))
    inputs = S.role_inputs(
        "decode", [S.WorkerView(0, calm), S.WorkerView(8, hot), S.WorkerView(9, None)],
        replicas=3, now=10, warmup=5, percentile=90,
    )  # fmt: skip
    assert (inputs.replicas, inputs.ready, inputs.warming) == (3, 2, 1)
    assert inputs.pending == 1
    m = inputs.metrics
    assert isinstance(m, planner.RoleMetrics)
    assert m.queue_depth == 0  # the warming worker's 9 queued are not counted
    # What a warming worker holds is load all the same (as the Prometheus path reads it).
    assert m.kv_usage == pytest.approx((0.2 + 1.0) / 2)


def test_a_counter_reset_counts_from_zero() -> None:
    old = scrape(0, prefill_text(0, {0.1: 500, INF: 500}, 500, 1e6))
    new = scrape(10, prefill_text(0, {0.1: 10, INF: 10}, 10, 1000))
    m = S.role_inputs(
        "prefill", [S.WorkerView(-100, new, old)], replicas=1, now=10, warmup=0, percentile=90
    ).metrics
    assert isinstance(m, planner.RoleMetrics)
    assert m.request_rate == pytest.approx(1.0)
    assert m.prompt_token_rate == pytest.approx(100.0)


def test_unavailable_never_zeros() -> None:
    nobody = S.role_inputs(
        "decode", [S.WorkerView(0, None)], replicas=2, now=10, warmup=0, percentile=90
    )
    assert nobody.metrics == planner.MetricsUnavailable(
        "no decode worker is scraped (1 asked, none answered /metrics)"
    )
    assert nobody.ready == 0
    bare = scrape(10, "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n")
    missing = S.role_inputs(
        "decode", [S.WorkerView(0, bare)], replicas=1, now=10, warmup=0, percentile=90
    )
    assert missing.metrics == planner.MetricsUnavailable(
        "vllm:inter_token_latency_seconds_bucket, vllm:kv_cache_usage_perc not exposed by the "
        "decode workers"
    )


def test_escaped_metric_names_are_read_too() -> None:
    text = "# TYPE vllm_num_requests_waiting gauge\nvllm_num_requests_waiting 3\n"
    assert S.parse(text)["vllm:num_requests_waiting"] == [({}, 3.0)]


def test_the_old_scrape_is_the_first_within_the_window() -> None:
    history = [S.Scrape(t, {}) for t in (0, 5, 10, 15)]
    assert S.pick_old(history, 15, 10) == history[1]
    assert S.pick_old(history, 15, 1) == history[2]  # none inside: the one before the latest
    assert S.pick_old(history[:1], 0, 10) is None


# ---------------------------------------------------------------------------
# The scaler's actions, with fake workers


class FakeWorker:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.url = f"http://{name}.invalid"
        self.pid: int | None = None

    def start(self) -> None:
        self.log.append(f"start {self.name}")

    async def wait_ready(self, startup_timeout_s: float | None = None) -> None:
        self.log.append(f"ready {self.name}")

    async def stop(self) -> int | None:
        self.log.append(f"stop {self.name}")
        return 0


def _pool(log: list[str]) -> processes.LocalPool:
    pool = api.InferencePool.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "p"},
         "spec": {"model": {"name": "m"}, "prefill": {"replicas": {"min": 1, "max": 3}},
                  "decode": {"replicas": {"min": 1, "max": 3}}}}
    )  # fmt: skip

    def set_endpoints(role: str, urls: Any) -> None:
        log.append(f"endpoints {role} {sorted(u.split('//')[1].split('.')[0] for u in urls)}")

    return processes.LocalPool(
        pool,
        "http://router.invalid",
        {
            "prefill": [FakeWorker("prefill-0", log)],
            "decode": [FakeWorker("decode-0", log), FakeWorker("decode-1", log)],
        },
        set_endpoints,
    )


def _decision(role: planner.Role, current: int, to: int) -> planner.RoleDecision:
    action: planner.Action = "scale-up" if to > current else "scale-down"
    return planner.RoleDecision(role, current, to, action, f"{role} {current}→{to}: why")


async def test_scaling_down_leaves_the_router_before_the_worker_stops() -> None:
    log: list[str] = []
    lines: list[str] = []
    pool = _pool(log)
    scaler = scaling.LocalAutoscaler(
        pool,
        lambda role, i: FakeWorker(f"{role}-{i}", log),
        lines.append,
        drain_timeout_s=0,  # type: ignore[arg-type,return-value]
    )
    plan = planner.Plan(
        decode=_decision("decode", 2, 1), prefill=None, state=planner.PlannerState()
    )
    await scaler.apply(plan)
    assert log == ["endpoints decode ['decode-0']", "stop decode-1"]
    assert lines == ["autoscale: decode 2→1: why"]
    assert [w.url for w in pool.workers["decode"]] == ["http://decode-0.invalid"]


async def test_scaling_up_joins_the_router_once_ready() -> None:
    log: list[str] = []
    pool = _pool(log)
    scaler = scaling.LocalAutoscaler(
        pool,
        lambda role, i: FakeWorker(f"{role}-{i}", log),
        lambda _: None,  # type: ignore[arg-type,return-value]
    )
    plan = planner.Plan(
        decode=_decision("decode", 2, 2),
        prefill=_decision("prefill", 1, 3),
        state=planner.PlannerState(),
    )
    await scaler.apply(plan)
    await asyncio.gather(*scaler._tasks)
    joined = log.index("endpoints prefill ['prefill-0', 'prefill-1', 'prefill-2']")
    assert log.index("ready prefill-2") < joined
    assert log.index("ready prefill-1") < log.index("endpoints prefill ['prefill-0', 'prefill-1']")
    assert len(pool.workers["prefill"]) == 3
    await scaler.close()
    assert {e for e in log if e.startswith("stop")} == {"stop prefill-1", "stop prefill-2"}

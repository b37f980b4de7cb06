"""One signals function: the Prometheus path, the scrape path (local mode) and the
replay all turn their readings into the planner's inputs through
``signals.role_inputs``, and the same samples give the same inputs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tandem import replay
from tandem.autoscaling import planner, prometheus, scrape, signals

INF = float("inf")
WINDOW, WARMUP, PERCENTILE = 60.0, 30.0, 90.0


def page(waiting: float, kv: float, success: float, ttft: dict[float, float],
         itl: dict[float, float]) -> str:  # fmt: skip
    """A vLLM /metrics page (the colon spelling, as vLLM writes it)."""
    lines = [
        "# TYPE vllm:num_requests_waiting gauge", f"vllm:num_requests_waiting {waiting}",
        "# TYPE vllm:kv_cache_usage_perc gauge", f"vllm:kv_cache_usage_perc {kv}",
        "# TYPE vllm:request_success counter", f"vllm:request_success_total {success}",
        "# TYPE vllm:prompt_tokens counter", f"vllm:prompt_tokens_total {success * 100}",
        "# TYPE vllm:time_to_first_token_seconds histogram",
    ]  # fmt: skip
    for le, n in ttft.items():
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{le}"}} {n}')
    lines.append("# TYPE vllm:inter_token_latency_seconds histogram")
    for le, n in itl.items():
        lines.append(f'vllm:inter_token_latency_seconds_bucket{{le="{le}"}} {n}')
    return "\n".join(lines) + "\n"


ROUTER = scrape.parse(
    '# TYPE tandem_router_queued_requests gauge\ntandem_router_queued_requests{pool="p"} 4\n'
)

# Two warm decode workers, scraped at the start and the end of the window.
WORKERS = [
    (
        scrape.Scrape(
            0.0,
            scrape.parse(
                page(1, 0.3, 10, {0.1: 5, 0.5: 10, INF: 10}, {0.02: 50, 0.05: 90, INF: 100})
            ),
        ),
        scrape.Scrape(
            60.0,
            scrape.parse(
                page(2, 0.5, 40, {0.1: 20, 0.5: 38, INF: 40}, {0.02: 200, 0.05: 380, INF: 400})
            ),
        ),
    ),
    (
        scrape.Scrape(
            0.0, scrape.parse(page(0, 0.1, 0, {0.1: 0, 0.5: 0, INF: 0}, {0.02: 0, 0.05: 0, INF: 0}))
        ),
        scrape.Scrape(
            60.0,
            scrape.parse(
                page(3, 0.7, 30, {0.1: 10, 0.5: 25, INF: 30}, {0.02: 100, 0.05: 250, INF: 300})
            ),
        ),
    ),
]


def _delta_buckets(name: str) -> list[tuple[float, float]]:
    merged: dict[float, float] = {}
    for old, new in WORKERS:
        for (labels, v_new), (_, v_old) in zip(
            new.samples[f"{name}_bucket"], old.samples[f"{name}_bucket"], strict=True
        ):
            le = float(labels["le"])
            merged[le] = merged.get(le, 0.0) + v_new - v_old
    return sorted(merged.items())


def _sum(name: str) -> float:
    return sum(scrape.total(new.samples, name) for _, new in WORKERS)


def _rate(name: str) -> float:
    return sum(
        (scrape.total(new.samples, name) - scrape.total(old.samples, name)) / WINDOW
        for old, new in WORKERS
    )


def prometheus_of_these_samples() -> Callable[[str], list[dict[str, Any]]]:
    """What Prometheus answers for each query of ``queries()``, evaluated over
    ``WORKERS`` and ``ROUTER`` by the PromQL each key stands for."""
    answers: dict[str, float | None] = {
        "targets": 2, "warm": 2,
        "engine_waiting": _sum(signals.WAITING),
        "request_rate": _rate(signals.SUCCESS),
        "ttft": signals.histogram_quantile(_delta_buckets(signals.TTFT), PERCENTILE / 100),
        "tpot": signals.histogram_quantile(_delta_buckets(signals.ITL), PERCENTILE / 100),
        "kv_usage": _sum(signals.KV_USAGE) / 2,
        "router_queued": scrape.total(ROUTER, signals.ROUTER_QUEUED),
    }  # fmt: skip
    for name in signals.required("decode"):
        answers[f"present {name}"] = 2
    keys = {
        promql: key
        for key, promql in prometheus.queries(
            'pool="p",role="decode"', "decode", PERCENTILE, WINDOW, WARMUP, 'pool="p"'
        ).items()
    }

    def query(promql: str) -> list[dict[str, Any]]:
        value = answers.get(keys[promql])
        return [] if value is None else [{"metric": {}, "value": [0, str(value)]}]

    return query


def test_the_same_samples_give_the_same_inputs_from_prometheus_and_from_scrapes() -> None:
    views = [scrape.WorkerView(-100.0, new, old) for old, new in WORKERS]
    scraped = scrape.role_inputs(
        "decode", views, replicas=3, now=60.0, warmup=WARMUP, percentile=PERCENTILE, router=ROUTER
    )
    source = prometheus.Source(prometheus.SourceSettings(), query=prometheus_of_these_samples())
    spec = planner.PlannerSpec(ttft=0.5, tpot=0.05, percentile=PERCENTILE)
    reading = asyncio.run(source.read(spec, "p", "decode", window=WINDOW, warmup=WARMUP))
    from_prometheus = reading.inputs(replicas=3, ready=2)
    assert from_prometheus == scraped
    m = scraped.metrics
    assert isinstance(m, planner.RoleMetrics)
    assert m.queue_depth == 2 + 3 + 4  # both engines' queues and the router's
    assert m.kv_usage == pytest.approx(0.6)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_the_router_queue_counts_for_decode_only(role: planner.Role) -> None:
    snap = signals.Snapshot(targets=1, warm=1, engine_waiting=2, router_queued=5)
    m = signals.metrics(role, snap)
    assert isinstance(m, planner.RoleMetrics)
    assert m.queue_depth == (7 if role == "decode" else 2)


def test_the_replay_reads_its_workers_through_the_same_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, signals.Snapshot]] = []
    real = signals.role_inputs

    def spy(role: planner.Role, snapshot: signals.Snapshot, **kw: int) -> planner.RoleInputs:
        seen.append((role, snapshot))
        return real(role, snapshot, **kw)

    monkeypatch.setattr(signals, "role_inputs", spy)
    spec = planner.PlannerSpec(ttft=0.5, tpot=0.025, percentile=99.0)
    workload = replay.steady(rate=2.0, duration=120.0, seed=1)
    replay.replay(workload, replay.Tandem(1, 1, spec))
    assert {role for role, _ in seen} == {"prefill", "decode"}
    assert all(s.router_queued == 0 for role, s in seen if role == "prefill")


def test_the_pools_attainment_weighs_each_router_by_its_requests() -> None:
    routers = [
        signals.RouterAttainment(300, {"ttft": 1.0, "tpot": 0.9, "both": 0.9}),
        signals.RouterAttainment(100, {"ttft": 0.5, "tpot": 1.0, "both": 0.5}),
        signals.RouterAttainment(0, {}),  # an idle replica: no shares, no weight
    ]
    got = signals.attainment(routers)
    assert got.requests == 400
    assert got.ttft == pytest.approx(350 / 400)
    assert got.tpot == pytest.approx(370 / 400)
    assert got.both == pytest.approx(320 / 400)
    assert signals.attainment([signals.RouterAttainment(0, {})]) == signals.PoolAttainment(0)
    assert signals.attainment([]) == signals.PoolAttainment()


def test_the_same_router_samples_give_the_same_attainment_from_prometheus_and_scrapes() -> None:
    # Two router replicas, told apart by instance (Prometheus' label, the embedded
    # source's too); a single router needs none (local mode).
    router = scrape.parse(
        "# TYPE tandem_router_slo_requests gauge\n"
        'tandem_router_slo_requests{instance="a",pool="p"} 30\n'
        'tandem_router_slo_requests{instance="b",pool="p"} 10\n'
        "# TYPE tandem_router_slo_attainment gauge\n"
        'tandem_router_slo_attainment{instance="a",objective="ttft",pool="p"} 0.9\n'
        'tandem_router_slo_attainment{instance="a",objective="both",pool="p"} 0.8\n'
        'tandem_router_slo_attainment{instance="b",objective="ttft",pool="p"} 0.5\n'
        'tandem_router_slo_attainment{instance="b",objective="both",pool="p"} 0.2\n'
    )
    views = [scrape.WorkerView(-100.0, new, old) for old, new in WORKERS]
    scraped = scrape.snapshot(
        "decode", views, now=60.0, warmup=WARMUP, percentile=PERCENTILE, router=router
    )
    # What the PromQL of each key evaluates to over these samples, by hand.
    answers = {"attainment_requests": 40.0, "attainment_ttft": (27 + 5) / 40,
               "attainment_both": (24 + 2) / 40, "targets": 2.0}  # fmt: skip
    keys = {
        promql: key
        for key, promql in prometheus.queries(
            'pool="p",role="decode"', "decode", PERCENTILE, WINDOW, WARMUP, 'pool="p"'
        ).items()
    }

    def query(promql: str) -> list[dict[str, Any]]:
        value = answers.get(keys[promql])
        return [] if value is None else [{"metric": {}, "value": [0, str(value)]}]

    source = prometheus.Source(prometheus.SourceSettings(), query=query)
    spec = planner.PlannerSpec(ttft=0.5, tpot=0.05, percentile=PERCENTILE)
    snap = asyncio.run(source.read(spec, "p", "decode", window=WINDOW, warmup=WARMUP)).snapshot
    assert snap is not None
    got = (snap.attainment_requests, snap.attainment_ttft, snap.attainment_tpot,
           snap.attainment_both)  # fmt: skip
    assert got == (
        scraped.attainment_requests,
        pytest.approx(scraped.attainment_ttft),
        None,
        pytest.approx(scraped.attainment_both),
    )
    assert got[0] == 40
    assert scrape.snapshot("prefill", views, now=60.0, warmup=WARMUP, percentile=PERCENTILE,
                           router=router).attainment_requests is None  # fmt: skip

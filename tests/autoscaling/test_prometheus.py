"""prometheus without a network: a fake query function stands in for Prometheus.

(The same adapter against a real Prometheus: e2e/prometheus.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tandem.autoscaling import planner, prometheus, signals

ROOT = Path(__file__).resolve().parents[2]
SPEC = planner.PlannerSpec(ttft=0.5, tpot=0.05, decode=planner.RoleBounds(1, 8))
SELECTOR = 'pool="p",role="decode"'


def vector(value: float | str) -> list[dict[str, Any]]:
    return [{"metric": {}, "value": [0, str(value)]}]


def fake(values: dict[str, float | str | None]) -> Callable[[str], list[dict[str, Any]]]:
    """Answers each query of ``queries()`` by its key; missing or None: empty vector."""
    by_promql = {}
    for role in ("prefill", "decode"):
        sel = f'pool="p",role="{role}"'
        for key, promql in prometheus.queries(sel, role, 90, 60, 120, 'pool="p"').items():
            by_promql[promql] = key

    def query(promql: str) -> list[dict[str, Any]]:
        value = values.get(by_promql[promql])
        return [] if value is None else vector(value)

    return query


HEALTHY: dict[str, float | str | None] = {
    "targets": 3, "warm": 2, "engine_waiting": 5, "request_rate": 12.5, "ttft": 0.3, "tpot": 0.02,
    "kv_usage": 0.4, "present vllm:num_requests_waiting": 3,
    "present vllm:inter_token_latency_seconds_bucket": 60,
    "present vllm:kv_cache_usage_perc": 3,
}  # fmt: skip


def read(values: dict[str, float | str | None], role: planner.Role = "decode") -> signals.Reading:
    source = prometheus.Source(prometheus.SourceSettings(), query=fake(values))
    return asyncio.run(source.read(SPEC, "p", role, window=60, warmup=120))


def test_healthy_reading() -> None:
    reading = read(HEALTHY)
    assert reading.metrics == planner.RoleMetrics(
        queue_depth=5, ttft=0.3, tpot=0.02, kv_usage=0.4, request_rate=12.5
    )
    assert reading.inputs(replicas=4, ready=3) == planner.RoleInputs(
        replicas=4, ready=3, warming=1, metrics=reading.metrics
    )


@pytest.mark.parametrize(
    ("change", "reason", "cause"),
    [
        ({"targets": None}, 'no decode worker is scraped (up{pool="p",role="decode"})', "NoTargets"),
        ({"targets": 0}, 'no decode worker is scraped (up{pool="p",role="decode"})', "NoTargets"),
        ({"present vllm:kv_cache_usage_perc": None}, "vllm:kv_cache_usage_perc not exposed by the decode workers", "MetricsMissing"),
        ({"present vllm:num_requests_waiting": None, "present vllm:kv_cache_usage_perc": None},
         "vllm:num_requests_waiting, vllm:kv_cache_usage_perc not exposed by the decode workers",
         "MetricsMissing"),
    ],
)  # fmt: skip
def test_unavailable_not_zeros(
    change: dict[str, float | None], reason: str, cause: planner.Cause
) -> None:
    m = read({**HEALTHY, **change}).metrics
    assert m == planner.MetricsUnavailable(reason)
    assert isinstance(m, planner.MetricsUnavailable)
    assert m.cause == cause


@pytest.mark.parametrize("empty", [None, "NaN", "+Inf"])
def test_an_empty_window_is_no_signal(empty: str | None) -> None:
    m = read({**HEALTHY, "ttft": empty, "tpot": empty}).metrics
    assert isinstance(m, planner.RoleMetrics)
    assert (m.ttft, m.tpot, m.kv_usage) == (None, None, 0.4)


def test_query_error_is_unavailable() -> None:
    def broken(promql: str) -> list[dict[str, Any]]:
        raise prometheus.QueryError(
            "Prometheus unreachable at http://x: refused", "PrometheusUnreachable"
        )

    source = prometheus.Source(prometheus.SourceSettings(), query=broken)
    reading = asyncio.run(source.read(SPEC, "p", "prefill", window=60, warmup=120))
    assert reading.metrics == planner.MetricsUnavailable(
        "Prometheus unreachable at http://x: refused"
    )
    assert isinstance(reading.metrics, planner.MetricsUnavailable)
    assert reading.metrics.cause == "PrometheusUnreachable"
    plan = planner.decide(
        SPEC, planner.Inputs(decode=reading.inputs(3, 3)), planner.PlannerState(), 0
    )
    assert (plan.decode.replicas, plan.decode.metrics_available) == (3, False)


def test_an_outage_is_logged_once_and_its_end_too(caplog: pytest.LogCaptureFixture) -> None:
    down = True

    def query(promql: str) -> list[dict[str, Any]]:
        if down:
            raise prometheus.QueryError(
                "Prometheus unreachable at http://x: refused", "PrometheusUnreachable"
            )
        return fake(HEALTHY)(promql)

    source = prometheus.Source(prometheus.SourceSettings(), query=query)

    def tick() -> signals.Reading:
        return asyncio.run(source.read(SPEC, "p", "decode", window=60, warmup=120))

    caplog.set_level("INFO", logger=prometheus.__name__)
    for _ in range(5):
        assert isinstance(tick().metrics, planner.MetricsUnavailable)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "unreachable" in warnings[0].getMessage()
    down = False
    assert isinstance(tick().metrics, planner.RoleMetrics)
    assert "answers again" in caplog.records[-1].getMessage()
    down = True
    tick()
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2


def test_closed_port_is_unreachable_quickly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    query = prometheus.prometheus_query(
        prometheus.SourceSettings(url=f"http://127.0.0.1:{port}", timeout=2)
    )
    with pytest.raises(
        prometheus.QueryError, match=f"Prometheus unreachable at http://127.0.0.1:{port}"
    ) as caught:
        query("up")
    assert caught.value.cause == "PrometheusUnreachable"


def test_prefill_reads_prompt_tokens() -> None:
    values = {
        **HEALTHY,
        "prompt_token_rate": 9000,
        "present vllm:time_to_first_token_seconds_bucket": 20,
    }
    m = read(values, "prefill").metrics
    assert isinstance(m, planner.RoleMetrics)
    assert (m.prompt_token_rate, m.kv_usage, m.tpot) == (9000, None, None)


def test_latency_and_queue_from_warm_workers_load_from_all() -> None:
    q = prometheus.queries(SELECTOR, "decode", 99, 60, 120)
    warm = 'on(instance) (up{pool="p",role="decode"} offset 120s)'
    assert q["tpot"].startswith("histogram_quantile(0.99, sum by (le) (rate(")
    assert warm in q["tpot"]
    assert warm in q["engine_waiting"]
    assert q["kv_usage"] == 'avg({__name__=~"vllm[:_]kv_cache_usage_perc",pool="p",role="decode"})'
    prefill = prometheus.queries(SELECTOR.replace("decode", "prefill"), "prefill", 99, 60, 120)
    assert "offset" not in prefill["prompt_token_rate"]
    assert "offset" not in prefill["request_rate"]


def test_the_promql_table_is_current() -> None:
    doc = (ROOT / "tandem" / "autoscaling" / "AUTOSCALING.md").read_text()
    for role in ("prefill", "decode"):
        for key, promql in prometheus.queries(
            f'pool="P",role="{role}"', role, 90, 60, 120, 'pool="P"'
        ).items():
            assert promql.replace("|", "\\|") in doc, (
                f"{role} {key} is missing from tandem/autoscaling/AUTOSCALING.md"
            )


def test_the_cause_of_a_query_error_is_carried_not_parsed() -> None:
    def refused(promql: str) -> list[dict[str, Any]]:
        raise prometheus.QueryError("Prometheus unreachable? no: it said 400", "QueryFailed")

    source = prometheus.Source(prometheus.SourceSettings(), query=refused)
    reading = asyncio.run(source.read(SPEC, "p", "decode", window=60, warmup=120))
    assert (reading.error, reading.error_reason) == (
        "Prometheus unreachable? no: it said 400",
        "QueryFailed",
    )
    assert reading.metrics == planner.MetricsUnavailable(reading.error)
    assert isinstance(reading.metrics, planner.MetricsUnavailable)
    assert reading.metrics.cause == "QueryFailed"


def test_the_decode_reading_carries_the_pools_slo_attainment() -> None:
    shares = {"attainment_requests": 1204, "attainment_ttft": 0.97, "attainment_tpot": 0.95,
              "attainment_both": 0.931}  # fmt: skip
    snap = read({**HEALTHY, **shares}).snapshot
    assert snap is not None
    assert (snap.attainment_requests, snap.attainment_ttft, snap.attainment_tpot,
            snap.attainment_both) == (1204, 0.97, 0.95, 0.931)  # fmt: skip
    # No request in the window: 0 requests, the shares 0/0 (NaN).
    idle = read({**HEALTHY, "attainment_requests": 0, "attainment_both": "NaN"}).snapshot
    assert idle is not None
    assert (idle.attainment_requests, idle.attainment_both) == (0, None)
    # No router reports attainment: nothing, not zeros.
    unread = read(HEALTHY).snapshot
    assert unread is not None
    assert (unread.attainment_requests, unread.attainment_both) == (None, None)
    assert "attainment_both" not in prometheus.queries(SELECTOR, "prefill", 90, 60, 120, 'pool="p"')


def test_router_replicas_are_weighed_by_their_requests() -> None:
    q = prometheus.queries(SELECTOR, "decode", 90, 60, 120, 'pool="p"')
    assert q["attainment_both"] == (
        'sum(tandem_router_slo_attainment{pool="p",objective="both"} * ignoring(objective) '
        'tandem_router_slo_requests{pool="p"}) / sum(tandem_router_slo_requests{pool="p"})'
    )

"""The embedded source: the operator scrapes the pool's pods itself (no Prometheus)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest

from tandem.autoscaling import embedded, planner, signals
from tandem.operator import autoscaler, kinds

SPEC = planner.PlannerSpec(ttft=0.5, tpot=0.05, percentile=90)


def decode_page(waiting: float, kv: float, tokens: float) -> str:
    return (
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting {waiting}\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc {kv}\n"
        "# TYPE vllm:inter_token_latency_seconds histogram\n"
        f'vllm:inter_token_latency_seconds_bucket{{le="0.02"}} {tokens}\n'
        f'vllm:inter_token_latency_seconds_bucket{{le="+Inf"}} {tokens}\n'
        f"vllm:inter_token_latency_seconds_count {tokens}\n"
        f"vllm:inter_token_latency_seconds_sum {tokens * 0.01}\n"
    )


ROUTER = '# TYPE tandem_router_queued_requests gauge\ntandem_router_queued_requests{pool="p"} 3\n'


class Pods:
    """Pages by URL, and which pods each component has."""

    def __init__(self, pods: Mapping[str, Sequence[str]], pages: dict[str, str]) -> None:
        self.pods = dict(pods)
        self.pages = pages
        self.fail = False

    async def endpoints(self, namespace: str | None, pool: str, component: str) -> Sequence[str]:
        if self.fail:
            raise RuntimeError("403 Forbidden: endpointslices")
        return self.pods.get(component, [])

    def transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
            page = self.pages.get(base)
            if page is None:
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200, text=page)

        return httpx.MockTransport(handler)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_pools_pods_become_the_planners_inputs() -> None:
    a, b, r = "http://198.18.0.5:8000", "http://198.18.0.6:8000", "http://198.18.0.9:8080"
    pods = Pods({"decode": [a, b], "router": [r]},
                {a: decode_page(1, 0.2, 100), b: decode_page(2, 0.6, 50), r: ROUTER})  # fmt: skip
    clock = Clock()
    source = embedded.Source(pods.endpoints, clock=clock, transport=pods.transport())

    def read() -> signals.Reading:
        got = asyncio.run(source.read_pool(SPEC, "p", ("decode",), window=60, warmup=30))
        return got["decode"]

    first = read()
    assert (first.targets, first.warm) == (2, 0)  # just seen: warming, no latency yet
    clock.now += 40
    pods.pages[a] = decode_page(4, 0.4, 300)
    pods.pages[b] = decode_page(5, 0.8, 150)
    second = read()
    assert (second.targets, second.warm) == (2, 2)
    m = second.metrics
    assert isinstance(m, planner.RoleMetrics)
    assert m.queue_depth == 4 + 5 + 3  # both engines' queues and the router's
    assert m.kv_usage == pytest.approx(0.6)
    assert m.tpot == pytest.approx(0.018)  # 300 new tokens, all in the 0.02 s bucket


def test_a_pod_that_stops_answering_is_not_a_target_and_is_forgotten_when_gone() -> None:
    a, b = "http://198.18.0.5:8000", "http://198.18.0.6:8000"
    pods = Pods({"decode": [a, b]}, {a: decode_page(0, 0.1, 1)})
    source = embedded.Source(pods.endpoints, clock=Clock(), transport=pods.transport())
    got = asyncio.run(source.read_pool(SPEC, "p", ("decode",), window=60, warmup=0))
    assert got["decode"].targets == 1
    pods.pods["decode"] = [a]
    asyncio.run(source.read_pool(SPEC, "p", ("decode",), window=60, warmup=0))
    assert set(source._pools["p"].history) == {a}


def test_no_pods_and_no_api_say_why() -> None:
    pods = Pods({}, {})
    source = embedded.Source(pods.endpoints, clock=Clock(), transport=pods.transport())
    got = asyncio.run(source.read_pool(SPEC, "p", ("prefill", "decode"), window=60, warmup=0))
    m = got["prefill"].metrics
    assert isinstance(m, planner.MetricsUnavailable)
    assert m.cause == "NoTargets"
    pods.fail = True
    got = asyncio.run(source.read_pool(SPEC, "p", ("decode",), window=60, warmup=0))
    m = got["decode"].metrics
    assert isinstance(m, planner.MetricsUnavailable)
    assert "403 Forbidden" in m.reason


def router_page(requests: int, both: float | None) -> str:
    page = (
        "# TYPE tandem_router_slo_requests gauge\n"
        f'tandem_router_slo_requests{{pool="p"}} {requests}\n'
        "# TYPE tandem_router_slo_attainment gauge\n"
    )
    if both is not None:
        page += f'tandem_router_slo_attainment{{pool="p",objective="both"}} {both}\n'
    return page


def test_each_router_replicas_attainment_weighs_as_its_requests() -> None:
    d, r1, r2, r3 = ("http://198.18.0.5:8000", "http://198.18.0.9:8080",
                     "http://198.18.0.10:8080", "http://198.18.0.11:8080")  # fmt: skip
    pages = {d: decode_page(0, 0.1, 1), r1: router_page(900, 0.9), r2: router_page(100, 0.5),
             r3: router_page(0, None)}  # fmt: skip
    pods = Pods({"prefill": [], "decode": [d], "router": [r1, r2, r3]}, pages)
    source = embedded.Source(pods.endpoints, clock=Clock(), transport=pods.transport())
    got = asyncio.run(source.read_pool(SPEC, "p", ("prefill", "decode"), window=60, warmup=0))
    snap = got["decode"].snapshot
    assert snap is not None
    assert snap.attainment_requests == 1000
    assert snap.attainment_both == pytest.approx((810 + 50) / 1000)  # not the mean, 0.7
    assert (snap.attainment_ttft, snap.attainment_tpot) == (None, None)  # not reported
    prefill = got["prefill"].snapshot
    assert prefill is not None
    assert prefill.attainment_requests is None  # the decode reading carries the pool's


class Slices:
    def __init__(self) -> None:
        self.asked: list[tuple[str | None, str]] = []

    async def list(
        self, resource: kinds.Resource, namespace: str | None, *, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        self.asked.append((namespace, label_selector))
        return [{"endpoints": [
            {"addresses": ["198.18.0.5"], "conditions": {"ready": True}},
            {"addresses": ["198.18.0.6"], "conditions": {"ready": False}},
            {"addresses": ["198.18.0.7"]},
        ]}]  # fmt: skip


def test_the_operator_finds_the_pods_in_the_services_endpointslices() -> None:
    slices = Slices()
    endpoints = autoscaler.pod_endpoints(slices)
    urls = asyncio.run(endpoints("team", "p", "decode"))
    assert urls == ["http://198.18.0.5:8000", "http://198.18.0.7:8000"]
    assert slices.asked == [("team", "kubernetes.io/service-name=p-decode")]
    assert asyncio.run(endpoints("team", "p", "router"))[0] == "http://198.18.0.5:8080"


def test_a_deleted_pool_is_forgotten_by_the_autoscaler_and_its_source() -> None:
    a = "http://198.18.0.5:8000"
    pods = Pods({"decode": [a]}, {a: decode_page(0, 0.1, 1)})
    source = embedded.Source(pods.endpoints, clock=Clock(), transport=pods.transport())
    asyncio.run(source.read_pool(SPEC, "p", ("decode",), window=60, warmup=0, namespace="ns"))
    assert "ns/p" in source._pools
    scaler = autoscaler.Autoscaler(None, source)  # type: ignore[arg-type]
    scaler.forget("ns", "p")
    assert "ns/p" not in source._pools

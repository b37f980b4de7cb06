"""Discovery: EndpointSlices (watched through a mock API server), kubeconfig, scraping."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandem.router import discovery, endpoints, settings


def _slice(
    name: str, *endpoints_: tuple[str, bool | None], port: int | None = 8000, rv: str = "1"
) -> dict[str, Any]:
    eps = []
    for address, ready in endpoints_:
        conditions = {} if ready is None else {"ready": ready}
        eps.append({"addresses": [address], "conditions": conditions})
    ports = [{"name": "http", "port": port}] if port else []
    return {"metadata": {"name": name, "resourceVersion": rv}, "endpoints": eps, "ports": ports}


def test_ready_urls_keeps_ready_and_unknown_endpoints() -> None:
    item = _slice("s", ("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", None), port=9000)
    assert discovery.ready_urls(item, 8000) == ["http://10.0.0.1:9000", "http://10.0.0.3:9000"]
    assert discovery.ready_urls(_slice("s", ("fd00::1", True), port=None), 8000) == [
        "http://[fd00::1]:8000"
    ]
    assert discovery.ready_urls({"metadata": {"name": "s"}, "endpoints": None}, 1) == []


def test_parse_load_reads_vllm_gauges() -> None:
    text = """# HELP vllm:num_requests_waiting waiting
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:num_requests_running{engine="0",model_name="m"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
vllm:num_requests_waiting_by_reason{reason="x"} 100
vllm:broken{a="b"} notanumber
process_cpu_seconds_total 12
"""
    assert discovery.parse_load(text) == endpoints.Load(waiting=5.0, running=7.0, kv_usage=0.375)
    assert discovery.parse_load("") == endpoints.Load()


async def test_static_discovery_publishes_once() -> None:
    seen: list[tuple[str, tuple[str, ...]]] = []
    await discovery.StaticDiscovery(["http://p:1"], ["http://d:1"]).run(
        lambda r, u: seen.append((r, tuple(u)))
    )
    assert seen == [("prefill", ("http://p:1",)), ("decode", ("http://d:1",))]


class _FakeApiServer:
    """Lists, then one watch stream of events, then 410 Gone, then a second list."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.lists = 0
        self.watches = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        params = request.url.params
        assert params["labelSelector"] in (
            "kubernetes.io/service-name=p-decode",
            "kubernetes.io/service-name=p-prefill",
        )
        decode = params["labelSelector"].endswith("decode")
        if "watch" not in params:
            self.lists += decode
            items = (
                [_slice("d-1", ("10.0.0.1", True))]
                if decode
                else [_slice("p-1", ("10.0.1.1", True))]
            )
            if decode and self.lists > 1:
                items = [_slice("d-1", ("10.0.0.9", True))]
            return httpx.Response(200, json={"metadata": {"resourceVersion": "5"}, "items": items})
        if not decode:
            await asyncio.sleep(30)  # a quiet watch
        self.watches += 1
        if self.watches == 1:
            events = [
                {"type": "ADDED", "object": _slice("d-2", ("10.0.0.2", True), rv="6")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "7"}}},
                {"type": "MODIFIED", "object": _slice("d-1", ("10.0.0.1", False), rv="8")},
                {"type": "DELETED", "object": _slice("d-2", rv="9")},
            ]
            body = "\n".join(json.dumps(e) for e in events) + "\n"
            return httpx.Response(200, content=body.encode())
        if self.watches == 2:
            assert params["resourceVersion"] == "9"
            return httpx.Response(410, json={"kind": "Status", "code": 410})
        await asyncio.sleep(30)
        return httpx.Response(500)


async def test_kubernetes_discovery_follows_endpointslices() -> None:
    server = _FakeApiServer()
    config = settings.KubernetesDiscovery(
        namespace="ns", prefill_service="p-prefill", decode_service="p-decode"
    )
    api = discovery.ApiServer("https://api.example", token="secret")
    found = discovery.KubernetesDiscovery(
        config, api, transport=httpx.MockTransport(server), backoff=0.01
    )
    seen: list[tuple[str, list[str]]] = []
    done = asyncio.Event()

    def sink(role: settings.Role, urls: Sequence[str]) -> None:
        seen.append((role, list(urls)))
        if urls == ["http://10.0.0.9:8000"]:
            done.set()

    task = asyncio.create_task(found.run(sink))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    decode = [urls for role, urls in seen if role == "decode"]
    assert decode == [
        ["http://10.0.0.1:8000"],
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        ["http://10.0.0.2:8000"],  # 10.0.0.1 no longer ready
        [],  # its slice deleted
        ["http://10.0.0.9:8000"],  # relisted after 410 Gone
    ]
    assert ("prefill", ["http://10.0.1.1:8000"]) in seen
    assert all(r.headers["authorization"] == "Bearer secret" for r in server.requests)
    assert server.requests[0].url.path == "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices"


async def test_aggregated_pools_publish_no_prefill_workers() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if "watch" in request.url.params:
            await asyncio.sleep(30)
        return httpx.Response(200, json={"metadata": {"resourceVersion": "1"}, "items": []})

    config = settings.KubernetesDiscovery(namespace="ns", decode_service="p-decode")
    found = discovery.KubernetesDiscovery(
        config, discovery.ApiServer("http://api"), transport=httpx.MockTransport(handler)
    )
    seen: list[tuple[str, list[str]]] = []
    task = asyncio.create_task(found.run(lambda r, u: seen.append((r, list(u)))))
    for _ in range(100):
        if len(seen) >= 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(seen) == [("decode", []), ("prefill", [])]


def test_kubeconfig_with_token_and_inline_ca(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    config = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": {"server": "http://127.0.0.1:6443/"}}],
        "users": [{"name": "u", "user": {"tokenFile": str(tmp_path / "token")}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    api = discovery.ApiServer.from_kubeconfig(path)
    assert api.url == "http://127.0.0.1:6443"
    assert api.ssl_context is None
    assert api.headers() == {"Authorization": "Bearer from-file"}
    with pytest.raises(ValueError, match="no context named"):
        discovery.ApiServer.from_kubeconfig(path, context="missing")


def test_kubeconfig_https_insecure(tmp_path: Path) -> None:
    config = {
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [
            {"name": "k", "cluster": {"server": "https://h:6443", "insecure-skip-tls-verify": True}}
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    api = discovery.ApiServer.from_kubeconfig(path)
    assert api.ssl_context is not None
    assert api.headers() == {"Authorization": "Bearer t"}
    bad = dict(
        config,
        clusters=[
            {
                "name": "k",
                "cluster": {
                    "server": "https://h",
                    "certificate-authority-data": base64.b64encode(b"junk").decode(),
                },
            }
        ],
    )
    path.write_text(json.dumps(bad))
    with pytest.raises(Exception):  # noqa: B017, PT011 - ssl's own error for a bad CA
        discovery.ApiServer.from_kubeconfig(path)


async def test_scraper_records_load_and_counts_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "bad":
            return httpx.Response(500)
        return httpx.Response(
            200, text="vllm:num_requests_waiting 4\nvllm:kv_cache_usage_perc 0.5\n"
        )

    decode = endpoints.EndpointSet("decode")
    decode.replace(["http://good:1", "http://bad:1"])
    errors_seen: list[str] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        task = asyncio.create_task(
            discovery.scrape_forever(
                client, [decode], interval=0.01, timeout=1, on_error=errors_seen.append
            )
        )
        for _ in range(100):
            if errors_seen and decode.snapshot(0).endpoints[0].load.waiting:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    good, bad = decode.snapshot(0).endpoints
    assert good.load == endpoints.Load(waiting=4, kv_usage=0.5)
    assert bad.load == endpoints.Load()
    assert errors_seen[0] == "decode"

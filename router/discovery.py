"""Where the workers are, and how loaded they are.

A discovery is an object with ``async run(sink)``: it calls ``sink(role, urls)``
whenever a role's set of ready workers changes, until cancelled (a static one
calls it once and returns). :class:`KubernetesDiscovery` watches EndpointSlices
with plain httpx against the API server (in-cluster service account, or a
kubeconfig): ready endpoints only, resumed from the last resourceVersion, relisted
on ``410 Gone``. :func:`scrape_forever` reads every worker's ``/metrics``.

Discovery talks to the API server over its own small client (its TLS settings are
the cluster's); worker traffic, scraping included, uses the app's one client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from tandem import kubeconfig, roles, vllm_metrics
from tandem.router import endpoints, settings

__all__ = [
    "ApiServer",
    "Discovery",
    "KubernetesDiscovery",
    "Sink",
    "StaticDiscovery",
    "build",
    "parse_load",
    "ready_urls",
    "scrape_forever",
]

logger = logging.getLogger(__name__)

Sink = Callable[[roles.Role, Sequence[str]], None]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_SECONDS = 290
"""Server-side watch timeout; the client's read timeout is a little longer."""


class Discovery(Protocol):
    async def run(self, sink: Sink) -> None: ...


class StaticDiscovery:
    """Fixed URLs (local mode, tests, benchmarks)."""

    def __init__(self, prefill: Sequence[str], decode: Sequence[str]) -> None:
        self._urls: dict[roles.Role, tuple[str, ...]] = {
            "prefill": tuple(prefill),
            "decode": tuple(decode),
        }

    async def run(self, sink: Sink) -> None:
        for role, urls in self._urls.items():
            sink(role, urls)


# ---------------------------------------------------------------------------
# Kubernetes


@dataclass(frozen=True)
class ApiServer:
    """How to reach and authenticate to the API server."""

    url: str
    ssl_context: ssl.SSLContext | None = None
    token: str | None = None
    token_file: Path | None = None
    """Re-read on every request: in-cluster tokens are rotated."""
    credentials: kubeconfig.Credentials | None = None
    """When loaded from a kubeconfig or the service account: asked per request
    (token files and credential plugins)."""

    def headers(self) -> dict[str, str]:
        if self.credentials is not None:
            value = self.credentials.authorization()
            return {"Authorization": value} if value else {}
        token = self.token
        if self.token_file is not None:
            token = self.token_file.read_text(encoding="utf-8").strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    @classmethod
    def from_credentials(cls, creds: kubeconfig.Credentials) -> ApiServer:
        return cls(creds.server, creds.ssl_context(), credentials=creds)

    @classmethod
    def in_cluster(cls, root: Path = kubeconfig.SERVICE_ACCOUNT) -> ApiServer:
        return cls.from_credentials(kubeconfig.in_cluster(root))

    @classmethod
    def from_kubeconfig(cls, path: str | Path, context: str | None = None) -> ApiServer:
        """The current (or named) context of a kubeconfig (:func:`tandem.kubeconfig.load`)."""
        return cls.from_credentials(kubeconfig.load(path, context))


def ready_urls(endpoint_slice: Mapping[str, Any], default_port: int) -> list[str]:
    """Base URLs of a slice's ready endpoints (``ready`` unset counts as ready, as the
    API documents; terminating endpoints are not ready)."""
    ports = endpoint_slice.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == "http"), None)
    if port is None:
        port = default_port
    urls = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ":" in address else address
            urls.append(f"http://{host}:{port}")
    return urls


class _GoneError(Exception):
    """The resourceVersion we hold is too old: list again."""


class KubernetesDiscovery:
    """Ready endpoints of the prefill and decode Services, from EndpointSlices."""

    def __init__(
        self,
        config: settings.KubernetesDiscovery,
        api: ApiServer,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: float = 1.0,
    ) -> None:
        self._config = config
        self._api = api
        self._transport = transport
        self._backoff = backoff

    async def run(self, sink: Sink) -> None:
        services: list[tuple[roles.Role, str]] = [("decode", self._config.decode_service)]
        if self._config.prefill_service:
            services.append(("prefill", self._config.prefill_service))
        else:
            sink("prefill", ())
        async with (
            httpx.AsyncClient(
                base_url=self._api.url,
                verify=self._api.ssl_context or True,
                transport=self._transport,
                timeout=httpx.Timeout(10.0, read=WATCH_SECONDS + 30.0),
            ) as client,
            asyncio.TaskGroup() as group,
        ):
            for role, service in services:
                group.create_task(self._follow(client, role, service, sink))

    async def _follow(
        self, client: httpx.AsyncClient, role: roles.Role, service: str, sink: Sink
    ) -> None:
        path = f"/apis/discovery.k8s.io/v1/namespaces/{self._config.namespace}/endpointslices"
        selector = {"labelSelector": f"{SERVICE_NAME_LABEL}={service}"}
        slices: dict[str, list[str]] = {}
        published: list[str] | None = None

        def publish() -> None:
            nonlocal published
            urls = sorted({u for found in slices.values() for u in found})
            if urls != published:
                published = urls
                logger.info("[%s] %s workers: %s", service, role, ", ".join(urls) or "none")
                sink(role, urls)

        version: str | None = None
        while True:
            try:
                if version is None:
                    response = await client.get(path, params=selector, headers=self._api.headers())
                    response.raise_for_status()
                    listed = response.json()
                    slices = {
                        item["metadata"]["name"]: ready_urls(item, self._config.port)
                        for item in listed.get("items") or []
                    }
                    version = listed["metadata"]["resourceVersion"]
                    publish()
                params = {
                    **selector,
                    "watch": "1",
                    "resourceVersion": version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": str(WATCH_SECONDS),
                }
                async with client.stream(
                    "GET", path, params=params, headers=self._api.headers()
                ) as stream:
                    if stream.status_code == 410:
                        raise _GoneError
                    stream.raise_for_status()
                    async for line in stream.aiter_lines():
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        obj = event.get("object") or {}
                        kind = event.get("type")
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                raise _GoneError
                            raise ValueError(f"watch error: {obj.get('message')}")
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        name = obj.get("metadata", {}).get("name")
                        if kind in ("ADDED", "MODIFIED") and name:
                            slices[name] = ready_urls(obj, self._config.port)
                        elif kind == "DELETED" and name:
                            slices.pop(name, None)
                        else:
                            continue  # BOOKMARK: only the version moved
                        publish()
            except _GoneError:
                version = None
            except (httpx.HTTPError, ValueError, KeyError, OSError) as exc:
                # Keep serving the last known workers; try again after a pause.
                logger.warning("[%s] endpointslice watch failed: %s", service, exc)
                version = None
                await asyncio.sleep(self._backoff)


def build(
    config: settings.RouterSettings, *, transport: httpx.AsyncBaseTransport | None = None
) -> Discovery:
    """The discovery the settings ask for (``transport`` reaches the API server)."""
    found = config.discovery
    if isinstance(found, settings.StaticDiscovery):
        return StaticDiscovery(found.prefill, found.decode)
    api = (
        ApiServer.from_kubeconfig(found.kubeconfig) if found.kubeconfig else ApiServer.in_cluster()
    )
    return KubernetesDiscovery(found, api, transport=transport)


# ---------------------------------------------------------------------------
# Load


_WAITING = vllm_metrics.NUM_REQUESTS_WAITING
_RUNNING = vllm_metrics.NUM_REQUESTS_RUNNING
_KV = (vllm_metrics.KV_CACHE_USAGE_PERC, vllm_metrics.KV_USAGE_LEGACY)


def parse_load(text: str) -> endpoints.Load:
    """Queue, running and KV usage from a vLLM ``/metrics`` page: summed over
    label sets (several engines behind one server), KV usage averaged."""
    waiting = running = kv_sum = 0.0
    kv_n = 0
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        if brace >= 0:
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, _, rest = line.partition(" ")
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if name == _WAITING:
            waiting += value
        elif name == _RUNNING:
            running += value
        elif name in _KV:
            kv_sum += value
            kv_n += 1
    return endpoints.Load(waiting, running, kv_sum / kv_n if kv_n else 0.0)


async def scrape_forever(
    client: httpx.AsyncClient,
    sets: Iterable[endpoints.EndpointSet],
    *,
    interval: float,
    timeout: float,  # noqa: ASYNC109 (per request, not for the whole loop)
    on_error: Callable[[roles.Role], None] = lambda role: None,
) -> None:
    """Every ``interval``, read every known worker's ``/metrics`` into its set."""
    sets = tuple(sets)

    async def one(eps: endpoints.EndpointSet, url: str) -> None:
        try:
            response = await client.get(f"{url}/metrics", timeout=timeout)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            logger.debug("scrape of %s failed: %s", url, exc)
            on_error(eps.role)
            return
        eps.record_load(url, parse_load(response.text))

    while True:
        jobs = [one(eps, url) for eps in sets for url in eps.urls]
        if jobs:
            await asyncio.gather(*jobs)
        await asyncio.sleep(interval)

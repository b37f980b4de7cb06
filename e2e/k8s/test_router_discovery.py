"""The router's EndpointSlice discovery against a real API server.

No kubelet runs here, so the slices are written by hand (as the EndpointSlice
controller would write them). The addresses are documentation addresses
(192.0.2.0/24): nothing ever connects to them; the test only reads what the
router's watch publishes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tandem.router import discovery, settings


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def endpoint_slice(
    name: str, service: str, namespace: str, ready: dict[str, bool]
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ok}} for ip, ok in ready.items()],
    }  # fmt: skip


@pytest.fixture
def namespace(kubeconfig: Path) -> Iterator[str]:
    name = f"disc-{uuid.uuid4().hex[:8]}"
    kubectl(kubeconfig, "create", "namespace", name)
    yield name
    kubectl(kubeconfig, "delete", "namespace", name, "--wait=false")


def apply(kubeconfig: Path, obj: dict[str, Any]) -> None:
    kubectl(kubeconfig, "apply", "--server-side", "-f", "-", stdin=json.dumps(obj))


async def next_for(queue: asyncio.Queue[tuple[str, list[str]]], role: str) -> list[str]:
    while True:
        got_role, urls = await asyncio.wait_for(queue.get(), timeout=20)
        if got_role == role:
            return urls


async def test_watch_follows_ready_endpoints(kubeconfig: Path, namespace: str) -> None:
    apply(kubeconfig, endpoint_slice("pool-decode-a", "pool-decode", namespace,
                                     {"192.0.2.1": True, "192.0.2.2": False}))  # fmt: skip
    apply(
        kubeconfig, endpoint_slice("pool-prefill-a", "pool-prefill", namespace, {"192.0.2.3": True})
    )
    # Another Service's slice in the same namespace must not leak in.
    apply(kubeconfig, endpoint_slice("other-a", "other", namespace, {"192.0.2.9": True}))

    config = settings.KubernetesDiscovery(
        namespace=namespace, prefill_service="pool-prefill", decode_service="pool-decode",
        kubeconfig=str(kubeconfig),
    )  # fmt: skip
    watcher = discovery.KubernetesDiscovery(config, discovery.ApiServer.from_kubeconfig(kubeconfig))
    queue: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()

    def sink(role: str, urls: Sequence[str]) -> None:
        queue.put_nowait((role, list(urls)))

    task = asyncio.create_task(watcher.run(sink))
    try:
        assert await next_for(queue, "decode") == ["http://192.0.2.1:8000"]
        assert await next_for(queue, "prefill") == ["http://192.0.2.3:8000"]

        # A worker turns ready; a second slice of the same Service adds one more.
        apply(kubeconfig, endpoint_slice("pool-decode-a", "pool-decode", namespace,
                                         {"192.0.2.1": True, "192.0.2.2": True}))  # fmt: skip
        assert await next_for(queue, "decode") == ["http://192.0.2.1:8000", "http://192.0.2.2:8000"]
        apply(
            kubeconfig,
            endpoint_slice("pool-decode-b", "pool-decode", namespace, {"192.0.2.4": True}),
        )
        assert await next_for(queue, "decode") == [
            "http://192.0.2.1:8000", "http://192.0.2.2:8000", "http://192.0.2.4:8000",
        ]  # fmt: skip

        # A slice goes away: its workers go with it.
        kubectl(kubeconfig, "-n", namespace, "delete", "endpointslice", "pool-decode-a")
        assert await next_for(queue, "decode") == ["http://192.0.2.4:8000"]
        kubectl(kubeconfig, "-n", namespace, "delete", "endpointslice", "pool-prefill-a")
        assert await next_for(queue, "prefill") == []
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

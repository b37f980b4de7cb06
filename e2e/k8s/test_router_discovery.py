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


WAIT = 20.0
"""Seconds to wait for the watch to publish a change."""


class Published:
    """What the watch has published so far, the latest list per role.

    The two roles' watches run concurrently, so their events arrive in either
    order: waiting on one role must not throw away the other's."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()
        self.latest: dict[str, list[str]] = {}
        self.history: list[tuple[str, list[str]]] = []

    def sink(self, role: str, urls: Sequence[str]) -> None:
        self.queue.put_nowait((role, list(urls)))

    async def until(self, role: str, urls: list[str]) -> None:
        """Wait until ``role``'s latest published list is ``urls``."""
        try:
            async with asyncio.timeout(WAIT):
                while self.latest.get(role) != urls:
                    got_role, got = await self.queue.get()
                    self.latest[got_role] = got
                    self.history.append((got_role, got))
        except TimeoutError:
            raise AssertionError(
                f"{role}: waited {WAIT}s for {urls}, latest is {self.latest.get(role)}"
            ) from None


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
    published = Published()
    task = asyncio.create_task(watcher.run(published.sink))
    try:
        await published.until("decode", ["http://192.0.2.1:8000"])
        await published.until("prefill", ["http://192.0.2.3:8000"])

        # A worker turns ready; a second slice of the same Service adds one more.
        apply(kubeconfig, endpoint_slice("pool-decode-a", "pool-decode", namespace,
                                         {"192.0.2.1": True, "192.0.2.2": True}))  # fmt: skip
        await published.until("decode", ["http://192.0.2.1:8000", "http://192.0.2.2:8000"])
        apply(
            kubeconfig,
            endpoint_slice("pool-decode-b", "pool-decode", namespace, {"192.0.2.4": True}),
        )
        await published.until("decode", [
            "http://192.0.2.1:8000", "http://192.0.2.2:8000", "http://192.0.2.4:8000",
        ])  # fmt: skip

        # A slice goes away: its workers go with it.
        kubectl(kubeconfig, "-n", namespace, "delete", "endpointslice", "pool-decode-a")
        await published.until("decode", ["http://192.0.2.4:8000"])
        kubectl(kubeconfig, "-n", namespace, "delete", "endpointslice", "pool-prefill-a")
        await published.until("prefill", [])
        assert not [h for h in published.history if "http://192.0.2.9:8000" in h[1]]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

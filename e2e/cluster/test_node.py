"""A real node: pods run, Services route, nothing leaves the bridge, and
``scripts/cluster.sh down`` leaves nothing behind (that test runs last: it stops
the session's cluster and brings up a fresh one for whatever follows)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import node


@pytest.fixture
def namespace(cluster_kubeconfig: Path) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    node.kubectl(cluster_kubeconfig, "create", "namespace", name)
    yield name
    node.kubectl(cluster_kubeconfig, "delete", "namespace", name, "--wait=false", check=False)


def _apply(kubeconfig: Path, namespace: str, *objects: dict[str, object]) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    node.kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", stdin=manifest)


def _deployment(
    name: str, image: str, replicas: int = 1, port: int | None = None
) -> dict[str, object]:
    container: dict[str, object] = {"name": name, "image": image, "imagePullPolicy": "Never"}
    if port is not None:
        container["ports"] = [{"containerPort": port}]
        container["readinessProbe"] = {
            "httpGet": {"path": "/ready", "port": port},
            "periodSeconds": 1,
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 5},
            },
        },
    }


def _rollout(kubeconfig: Path, namespace: str, name: str) -> None:
    result = node.kubectl(
        kubeconfig, "rollout", "status", f"deployment/{name}", "-n", namespace, "--timeout=90s",
        check=False, timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        pods = node.kubectl(
            kubeconfig, "get", "pods,events", "-n", namespace, "-o", "wide", check=False
        )
        pytest.fail(f"{name} not ready: {result.stderr}\n{pods.stdout}")


def _first_pod(kubeconfig: Path, namespace: str, app: str) -> str:
    return node.kubectl(
        kubeconfig, "get", "pods", "-n", namespace, "-l", f"app={app}",
        "-o", "jsonpath={.items[0].metadata.name}",
    ).stdout  # fmt: skip


def test_node_ready(cluster_kubeconfig: Path) -> None:
    nodes = json.loads(node.kubectl(cluster_kubeconfig, "get", "nodes", "-o", "json").stdout)[
        "items"
    ]
    assert [n["metadata"]["name"] for n in nodes] == [node.NODE_NAME]
    ready = {c["type"]: c["status"] for c in nodes[0]["status"]["conditions"]}["Ready"]
    assert ready == "True"


def test_pause_deployment_becomes_ready(cluster_kubeconfig: Path, namespace: str) -> None:
    _apply(cluster_kubeconfig, namespace, _deployment("pause", node.PAUSE_IMAGE, replicas=2))
    _rollout(cluster_kubeconfig, namespace, "pause")


def test_pod_reaches_cluster_ip_service(cluster_kubeconfig: Path, namespace: str) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    _apply(
        cluster_kubeconfig, namespace, service,
        _deployment("echo", node.ECHO_IMAGE, replicas=2, port=8080),
    )  # fmt: skip
    _rollout(cluster_kubeconfig, namespace, "echo")
    # The client starts after the Service exists, so it also has ECHO_SERVICE_HOST.
    _apply(cluster_kubeconfig, namespace, _deployment("client", node.ECHO_IMAGE, port=8080))
    _rollout(cluster_kubeconfig, namespace, "client")
    client = _first_pod(cluster_kubeconfig, namespace, "client")
    ip = node.kubectl(
        cluster_kubeconfig,
        "get",
        "service",
        "echo",
        "-n",
        namespace,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ).stdout
    assert ip.startswith("198.19.")
    own = node.kubectl(
        cluster_kubeconfig,
        "exec",
        "-n",
        namespace,
        client,
        "--",
        "/echo",
        "get",
        "http://localhost:8080/",
    ).stdout
    assert own.startswith("echo client-")

    answer = node.kubectl(
        cluster_kubeconfig,
        "exec",
        "-n",
        namespace,
        client,
        "--",
        "/echo",
        "get",
        f"http://{ip}/from-pod",
    ).stdout
    assert answer.startswith("echo echo-")
    assert answer.rstrip().endswith("GET /from-pod")

    # From the host, too: the route sends the Service range to the bridge.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{ip}/from-host", timeout=5) as response:
        assert response.read().decode().rstrip().endswith("GET /from-host")

    # Pods reach the apiserver through the kubernetes Service.
    kube = node.kubectl(
        cluster_kubeconfig, "exec", "-n", namespace, client, "--", "/echo", "get", "https://198.19.0.1/",
        check=False,
    )  # fmt: skip
    assert "certificate signed by unknown authority" in kube.stderr  # TLS answered: reachable

    logs = node.kubectl(cluster_kubeconfig, "logs", "-n", namespace, "deployment/echo").stdout
    assert isinstance(logs, str)  # kubectl logs works (the kubelet's serving cert is trusted)


def test_nothing_leaves_the_node(cluster_kubeconfig: Path, namespace: str) -> None:
    _apply(cluster_kubeconfig, namespace, _deployment("probe", node.ECHO_IMAGE, port=8080))
    _rollout(cluster_kubeconfig, namespace, "probe")
    probe = _first_pod(cluster_kubeconfig, namespace, "probe")
    for url in ("http://1.1.1.1/", "http://192.0.2.1/"):
        result = node.kubectl(
            cluster_kubeconfig,
            "exec",
            "-n",
            namespace,
            probe,
            "--",
            "/echo",
            "get",
            url,
            check=False,
        )
        assert result.returncode != 0, url
        assert "network is unreachable" in result.stderr, result.stderr


def test_up_recovers_from_a_killed_run(cluster_kubeconfig: Path) -> None:
    """Every component killed with SIGKILL (pods, shims, mounts, bridge stay): `up` cleans and starts."""
    for pid in node.pids().values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    stale = node.leftovers()
    assert any(line.startswith("mount ") for line in stale)
    started = time.monotonic()
    kubeconfig = node.up()
    assert kubeconfig == cluster_kubeconfig
    assert time.monotonic() - started < 120
    test_node_ready(cluster_kubeconfig)


def test_down_leaves_nothing_and_up_again(cluster_kubeconfig: Path) -> None:
    before = node.leftovers()
    kinds = {line.split()[0] for line in before}
    assert {"process", "mount", "cgroup", "link", "route", "chain", "path"} <= kinds, before
    node.down()
    assert node.leftovers() == []
    node.down()  # idempotent
    assert node.leftovers() == []
    # Leave a cluster for the session fixture's own teardown (and any later test).
    node.up()
    test_node_ready(cluster_kubeconfig)

"""Smoke tests of the real control plane, through kubectl.

They check what the rest of the e2e suite leans on: the controller-manager
turns Deployments into ReplicaSets and Pods and garbage-collects by
ownerReference; the apiserver validates CRDs, does server-side apply with
field managers, serves status and scale subresources, and authorizes with RBAC
(checked by impersonation).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.k8s import controlplane

pytestmark = pytest.mark.k8s

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
TIMEOUT = 60.0

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.e2e.tandem.dev
spec:
  group: e2e.tandem.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
              color: {type: string}
              replicas: {type: integer, minimum: 0}
            x-kubernetes-validations:
            - rule: "!has(self.color) || self.color != 'invisible'"
              message: widgets must be visible
          status:
            type: object
            properties:
              replicas: {type: integer}
              phase: {type: string}
"""


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [KUBECTL, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)


def eventually(probe: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def kubectl(kubeconfig: Path) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return any(
        ref.get("uid") == owner["metadata"]["uid"] and ref.get("controller") is True
        for ref in obj["metadata"].get("ownerReferences", [])
    )


def test_apiserver_reports_a_real_version(kubectl: Kubectl) -> None:
    version = kubectl.json("version")["serverVersion"]
    assert version["gitVersion"].startswith("v1."), version
    assert int(version["minor"].rstrip("+")) >= 30, version


def test_deployment_gets_replicaset_and_pods_then_garbage_collected(
    kubectl: Kubectl, namespace: str
) -> None:
    kubectl.run(
        "-n", namespace, "create", "deployment", "web",
        "--image=registry.invalid/never-pulled:1", "--replicas=2",
    )  # fmt: skip
    deployment = kubectl.json("-n", namespace, "get", "deployment", "web")

    def replicasets() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = kubectl.json("-n", namespace, "get", "replicasets")["items"]
        return items

    rs_list = eventually(replicasets, "the Deployment controller to create a ReplicaSet")
    assert len(rs_list) == 1
    rs = rs_list[0]
    assert owned_by(rs, deployment), rs["metadata"]
    assert rs["spec"]["replicas"] == 2

    # No kubelet or scheduler: the Pods exist (ReplicaSet controller) but stay Pending.
    def pods() -> list[dict[str, Any]]:
        items = kubectl.json("-n", namespace, "get", "pods")["items"]
        return items if len(items) == 2 else []

    for pod in eventually(pods, "the ReplicaSet controller to create 2 Pods"):
        assert owned_by(pod, rs), pod["metadata"]
        assert pod["status"].get("phase") == "Pending"

    kubectl.run("-n", namespace, "delete", "deployment", "web", "--cascade=background")
    eventually(lambda: not replicasets(), "the garbage collector to delete the ReplicaSet")
    eventually(
        lambda: not kubectl.json("-n", namespace, "get", "pods")["items"],
        "the garbage collector to delete the Pods",
    )


@pytest.fixture(scope="module")
def widget_crd(kubectl: Kubectl) -> Iterator[str]:
    kubectl.run("apply", "--server-side", "-f", "-", stdin=CRD)
    kubectl.run(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/widgets.e2e.tandem.dev",
    )  # fmt: skip
    yield "widgets.e2e.tandem.dev"
    kubectl.run("delete", "crd", "widgets.e2e.tandem.dev", "--wait=false", check=False)


def widget(namespace: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "e2e.tandem.dev/v1",
            "kind": "Widget",
            "metadata": {"name": "w1", "namespace": namespace},
            "spec": spec,
        }
    )


def test_custom_object_server_side_apply(kubectl: Kubectl, widget_crd: str, namespace: str) -> None:
    applied = kubectl.run(
        "apply", "--server-side", "--field-manager=tandem-test", "-o", "json", "-f", "-",
        stdin=widget(namespace, size=3, color="red", replicas=1),
    )  # fmt: skip
    obj = json.loads(applied.stdout)
    assert obj["spec"] == {"size": 3, "color": "red", "replicas": 1}
    live = kubectl.json("-n", namespace, "get", "widget", "w1", "--show-managed-fields")
    managers = {(m["manager"], m["operation"]) for m in live["metadata"]["managedFields"]}
    assert ("tandem-test", "Apply") in managers

    # Another manager claiming an owned field conflicts unless it forces.
    conflict = kubectl.run(
        "apply", "--server-side", "--field-manager=intruder", "-f", "-",
        stdin=widget(namespace, size=3, color="blue"), check=False,
    )  # fmt: skip
    assert conflict.returncode != 0
    assert "conflict" in conflict.stderr.lower()
    assert kubectl.json("-n", namespace, "get", "widget", "w1")["spec"]["color"] == "red"

    # Validation: the OpenAPI schema and the CEL rule both reject nonsense.
    too_big = kubectl.run(
        "apply", "--server-side", "--field-manager=tandem-test", "-f", "-",
        stdin=widget(namespace, size=11), check=False,
    )  # fmt: skip
    assert too_big.returncode != 0
    assert "spec.size" in too_big.stderr
    invisible = kubectl.run(
        "apply", "--server-side", "--field-manager=tandem-test", "-f", "-",
        stdin=widget(namespace, size=3, color="invisible"), check=False,
    )  # fmt: skip
    assert invisible.returncode != 0
    assert "widgets must be visible" in invisible.stderr


def test_custom_object_status_and_scale_subresources(
    kubectl: Kubectl, widget_crd: str, namespace: str
) -> None:
    kubectl.run(
        "apply", "--server-side", "--field-manager=tandem-test", "-f", "-",
        stdin=widget(namespace, size=1, replicas=1),
    )  # fmt: skip
    # The main resource ignores status; the status subresource ignores spec.
    kubectl.run(
        "-n", namespace, "patch", "widget", "w1", "--type=merge",
        "-p", '{"status": {"phase": "Ignored"}}',
    )  # fmt: skip
    assert "status" not in kubectl.json("-n", namespace, "get", "widget", "w1")
    kubectl.run(
        "-n", namespace, "patch", "widget", "w1", "--subresource=status", "--type=merge",
        "-p", '{"status": {"phase": "Ready", "replicas": 1}, "spec": {"size": 9}}',
    )  # fmt: skip
    obj = kubectl.json("-n", namespace, "get", "widget", "w1")
    assert obj["status"] == {"phase": "Ready", "replicas": 1}
    assert obj["spec"]["size"] == 1

    kubectl.run("-n", namespace, "scale", "widget", "w1", "--replicas=4")
    assert kubectl.json("-n", namespace, "get", "widget", "w1")["spec"]["replicas"] == 4
    scale_url = f"/apis/e2e.tandem.dev/v1/namespaces/{namespace}/widgets/w1/scale"
    scale = json.loads(kubectl.run("get", "--raw", scale_url).stdout)
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 4
    assert scale["status"]["replicas"] == 1


def test_rbac_by_impersonation(kubectl: Kubectl, namespace: str) -> None:
    who = ["--as=jane", "--as-group=tandem:viewers", "-n", namespace]

    def can(verb: str, resource: str) -> str:
        return kubectl.run("auth", "can-i", verb, resource, *who, check=False).stdout.strip()

    assert can("list", "deployments.apps") == "no"
    denied = kubectl.run("get", "deployments", *who, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()

    kubectl.run(
        "-n", namespace, "create", "role", "viewer",
        "--verb=get,list,watch", "--resource=deployments.apps",
    )  # fmt: skip
    kubectl.run(
        "-n", namespace, "create", "rolebinding", "viewers",
        "--role=viewer", "--group=tandem:viewers",
    )  # fmt: skip
    eventually(lambda: can("list", "deployments.apps") == "yes", "the RoleBinding to take effect")
    assert can("create", "deployments.apps") == "no"
    assert can("list", "secrets") == "no"
    assert kubectl.run("get", "deployments", *who).returncode == 0


def test_stop_leaves_no_processes(controlplane_bin_dir: Path | None, tmp_path: Path) -> None:
    """A second, short-lived control plane: started, used, stopped, gone."""
    if controlplane_bin_dir is None:
        pytest.skip("KUBECONFIG names an outside cluster; no local binaries")
    plane = controlplane.ControlPlane(
        controlplane.Binaries.in_dir(controlplane_bin_dir), tmp_path / "cp"
    )
    with plane:
        pids = plane.pids
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert Kubectl(plane.kubeconfig).run("get", "--raw", "/readyz").stdout == "ok"
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) still running after stop()"
    assert plane.pids == {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie would still answer; ours are reaped by Popen.wait() in stop().
    return True

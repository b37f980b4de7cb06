"""The Helm chart: lint, a matrix of renders each checked by the real API server
(server-side dry run), fail-fast values, RBAC equal to what the code does, and a
real install / upgrade / uninstall.

The helpers here (``Kubectl``, ``Helm``, ``eventually``) are used by
test_operator.py too.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.operator import cli as operator_cli
from tandem.operator import crd, kinds

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tandem"
INSTALL_HELM = ROOT / "scripts" / "install-helm.sh"
TIMEOUT = 60.0


# ---------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: Path

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
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

    def find(self, *args: str) -> Any:
        """``get -o json``, or None when it is not found."""
        result = self.run("get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            pytest.fail(f"kubectl get {' '.join(args)} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.run("create", "namespace", name)
        return name


@dataclass(frozen=True)
class Helm:
    binary: Path
    kubeconfig: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "HELM_CACHE_HOME": str(self.binary.parent / ".helm-cache"),
                 "HELM_CONFIG_HOME": str(self.binary.parent / ".helm-config"),
                 "HELM_DATA_HOME": str(self.binary.parent / ".helm-data")},
        )  # fmt: skip
        if check and result.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def template(
        self, *values: str, namespace: str = "tandem-system", release: str = "tandem"
    ) -> list[dict[str, Any]]:
        out = self.run("template", release, str(CHART), "--namespace", namespace, *values)
        return [d for d in yaml.safe_load_all(out.stdout) if d]


def eventually(probe: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``probe`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


def find_doc(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}"
    return found[0]


def install_helm() -> Path:
    """The helm 3 binary (scripts/install-helm.sh is a no-op once it is cached)."""
    result = subprocess.run(
        ["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/install-helm.sh failed:\n{result.stderr[-3000:]}", pytrace=False)
    return Path(result.stdout.split()[-1])


@pytest.fixture(scope="module")
def kubectl(kubeconfig: Path) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture(scope="module")
def helm(kubeconfig: Path) -> Helm:
    return Helm(install_helm(), kubeconfig)


# ---------------------------------------------------------------------------
# Lint and render


MATRIX: dict[str, list[str]] = {
    "defaults": [],
    "single-replica": ["--set", "operator.replicas=1", "--set",
                       "operator.leaderElection.enabled=false"],
    "watch-namespaces": ["--set", "operator.watchNamespaces={team-a,team-b}"],
    "existing-service-account": ["--set", "serviceAccount.create=false", "--set",
                                 "serviceAccount.name=ops-bot", "--set", "rbac.create=false"],
    "everything-set": [
        "--set", "image.digest=sha256:" + "a" * 64,
        "--set", "imagePullSecrets[0].name=registry",
        "--set", "fullnameOverride=tandem-ctl",
        "--set", "operator.replicas=3",
        "--set", "operator.logFormat=json",
        "--set", "operator.logLevel=debug",
        "--set", "operator.routerImage=registry.example/router:1",
        "--set", "operator.resyncInterval=15",
        "--set", "operator.healthPort=9000",
        "--set", "operator.leaderElection.leaseName=my-lease",
        "--set", "operator.nodeSelector.pool=system",
        "--set", "operator.tolerations[0].key=dedicated",
        "--set", "operator.tolerations[0].operator=Exists",
        "--set", "operator.podAnnotations.team=ml",
        "--set", "operator.podLabels.tier=control",
        "--set", "operator.env[0].name=EXTRA",
        "--set-string", "operator.env[0].value=1",
        "--set", "serviceAccount.annotations.owner=ml",
        "--set", "podDisruptionBudget.enabled=false",
        "--set", "autoscaling.prometheusUrl=http://prometheus.monitoring:9090",
        "--set", "autoscaling.prometheusTimeout=3",
    ],
}  # fmt: skip


def test_chart_ships_the_generated_crd() -> None:
    chart_crd = CHART / "crds" / crd.CRD_FILENAME
    assert chart_crd.read_bytes() == (ROOT / "crds" / crd.CRD_FILENAME).read_bytes()


@pytest.mark.parametrize("case", list(MATRIX))
def test_lint(helm: Helm, case: str) -> None:
    result = helm.run("lint", "--strict", str(CHART), *MATRIX[case], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def render_namespaces(kubectl: Kubectl) -> Iterator[str]:
    """The release namespace and the watched namespaces of the matrix, for dry runs."""
    release_ns = kubectl.namespace("helm-render")
    for ns in ("team-a", "team-b"):
        if kubectl.find("namespace", ns) is None:
            kubectl.run("create", "namespace", ns)
    yield release_ns
    kubectl.run("delete", "namespace", release_ns, "--wait=false", check=False)


@pytest.mark.parametrize("case", list(MATRIX))
def test_render_is_accepted_by_the_api_server(
    helm: Helm, kubectl: Kubectl, render_namespaces: str, case: str
) -> None:
    docs = helm.template(*MATRIX[case], namespace=render_namespaces)
    assert docs, "nothing rendered"
    result = kubectl.run(
        "apply", "--server-side", "--dry-run=server", "--field-manager=helm-test", "-f", "-",
        stdin=yaml.safe_dump_all(docs), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    deployment = find_doc(docs, "Deployment", "-operator")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The rendered arguments are ones the operator's own parser accepts.
    args = [a.replace("$(POD_NAME)", "pod-0") for a in container["args"]]
    parsed = operator_cli.build_parser().parse_args(args)
    settings = operator_cli.settings_from(parsed)
    operator_cli.autoscaler_settings_from(parsed)
    assert settings.health_port == container["ports"][0]["containerPort"]


def test_everything_set_is_rendered(helm: Helm) -> None:
    docs = helm.template(*MATRIX["everything-set"])
    deployment = find_doc(docs, "Deployment", "-operator")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/tandem-dev/tandem@sha256:" + "a" * 64
    assert "--router-image=registry.example/router:1" in container["args"]
    assert "--lease-name=my-lease" in container["args"]
    assert "--prometheus-url=http://prometheus.monitoring:9090" in container["args"]
    assert "--prometheus-timeout=3" in container["args"]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert deployment["metadata"]["name"] == "tandem-ctl-operator"
    assert deployment["spec"]["replicas"] == 3
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    role = find_doc(docs, "Role", "-leader-election")
    assert role["rules"] == kinds.operator_lease_rules("my-lease")


def test_watch_namespaces_binds_per_namespace(helm: Helm) -> None:
    docs = helm.template(*MATRIX["watch-namespaces"])
    assert not [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    bindings = [
        d for d in docs if d["kind"] == "RoleBinding" and "leader" not in d["metadata"]["name"]
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert {b["roleRef"]["kind"] for b in bindings} == {"ClusterRole"}
    args = find_doc(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace=")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_existing_service_account_creates_no_rbac(helm: Helm) -> None:
    docs = helm.template(*MATRIX["existing-service-account"])
    assert {d["kind"] for d in docs} == {"Deployment", "PodDisruptionBudget"}
    pod = find_doc(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ops-bot"


def test_cluster_role_is_exactly_what_the_operator_does(helm: Helm) -> None:
    docs = helm.template()
    role = find_doc(docs, "ClusterRole")
    rules = sorted(role["rules"], key=lambda r: (r["apiGroups"][0], r["resources"][0]))
    assert rules == kinds.operator_cluster_rules()
    lease_role = find_doc(docs, "Role", "-leader-election")
    assert lease_role["rules"] == kinds.operator_lease_rules("tandem-operator")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "image.repository="], "image.repository"),
        (["--set", "operator.leaderElection.enabled=false"], "needs operator.leaderElection"),
        (["--set", "serviceAccount.create=false"], "serviceAccount.name is required"),
        (["--set", "rbac.create=false"], "rbac.create=false"),
        (["--set", "operator.leaderElection.renewDeadline=30"], "retryPeriod < renewDeadline"),
        (["--set", "operator.replicaz=2"], "replicaz"),
        (["--set", "operator.logLevel=loud"], "logLevel"),
        (["--set", "operator.watchNamespaces={Not_A_Namespace}"], "watchNamespaces"),
        (["--set", "image.digest=latest"], "digest"),
        (["--set", "autoscaling.prometheusUrl=prometheus:9090"], "prometheusUrl"),
        (["--set", "operator.env[0].name=X", "--set", "operator.env[0].value=1"], "value"),
    ],
)
def test_bad_values_fail_fast(helm: Helm, values: list[str], message: str) -> None:
    result = helm.run("template", "t", str(CHART), *values, check=False)
    assert result.returncode != 0, f"rendered with {values}"
    assert message in result.stderr, result.stderr


# ---------------------------------------------------------------------------
# A real install


def test_install_upgrade_uninstall(helm: Helm, kubectl: Kubectl) -> None:
    ns = kubectl.namespace("helm-install")
    release = f"t{uuid.uuid4().hex[:5]}"
    try:
        out = helm.run("install", release, str(CHART), "--namespace", ns)
        assert f"kubectl -n {ns} rollout status deployment/{release}-tandem-operator" in out.stdout
        name = f"{release}-tandem-operator"
        deployment = kubectl.json("-n", ns, "get", "deployment", name)
        assert deployment["spec"]["replicas"] == 2
        kubectl.run("get", "clusterrole", name)
        kubectl.run("get", "clusterrolebinding", name)
        kubectl.run("-n", ns, "get", "role", f"{name}-leader-election")
        kubectl.run("-n", ns, "get", "serviceaccount", name)
        kubectl.run("-n", ns, "get", "poddisruptionbudget", name)
        kubectl.run("get", "crd", crd.crd()["metadata"]["name"])
        # No kubelet here: the ReplicaSet controller makes the pods, nobody runs them.
        eventually(
            lambda: kubectl.json("-n", ns, "get", "pods", "-l",
                                 "app.kubernetes.io/component=operator")["items"],
            "the operator's pods to be created",
        )  # fmt: skip

        sa = f"system:serviceaccount:{ns}:{name}"
        can = kubectl.run("auth", "can-i", "patch", "inferencepools.tandem.dev/status", "--as", sa,
                          "-n", "default", check=False)  # fmt: skip
        assert can.stdout.strip() == "yes"
        cannot = kubectl.run("auth", "can-i", "get", "secrets", "--as", sa, "-n", "default",
                             check=False)  # fmt: skip
        assert cannot.stdout.strip() == "no"

        helm.run("upgrade", release, str(CHART), "--namespace", ns,
                 "--set", "operator.resyncInterval=30", "--set", "operator.replicas=1")  # fmt: skip
        deployment = kubectl.json("-n", ns, "get", "deployment", name)
        assert deployment["spec"]["replicas"] == 1
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--resync-interval=30" in args
        assert kubectl.find("-n", ns, "poddisruptionbudget", name) is None

        helm.run("uninstall", release, "--namespace", ns, "--wait")
        assert kubectl.find("-n", ns, "deployment", name) is None
        assert kubectl.find("clusterrole", name) is None
        # Helm keeps CRDs (and so the users' pools) on uninstall.
        kubectl.run("get", "crd", crd.crd()["metadata"]["name"])
    finally:
        helm.run("uninstall", release, "--namespace", ns, check=False)
        kubectl.run("delete", "namespace", ns, "--wait=false", check=False)

"""The operator against a real API server, with exactly its ServiceAccount's rights.

The chart is installed by Helm; the operator runs here as a subprocess, with the
arguments of the chart's Deployment and a token of the chart's ServiceAccount
(TokenRequest), so every call it makes is authorized by the chart's RBAC and
nothing else. There is no kubelet: pods are created, never run, so pools never
become Ready, which the status must say.

Tests run in file order and share the examples' pools (the idempotency check
comes before any edit).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.k8s.test_helm import CHART, Helm, Kubectl, find_doc, install_helm
from tandem.operator import applying, planning, validation

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
NAMESPACE = "tandem-system"
RELEASE = "tandem"
RESYNC = 3
WAIT = 60.0
CHILD_KINDS = (
    "deployments,services,configmaps,serviceaccounts,roles,rolebindings,poddisruptionbudgets"
)
VALUES = [
    "--set", f"operator.resyncInterval={RESYNC}",
    "--set", "operator.leaderElection.leaseDuration=6",
    "--set", "operator.leaderElection.renewDeadline=4",
    "--set-json", "operator.leaderElection.retryPeriod=0.5",
    # These tests are the reconciler's: pods never run here, and the autoscaler (on by
    # default, scraping the pools' pods) would clamp the replicas they set by hand. It is
    # tested in tests/operator, e2e/autoscaling and the cluster tier.
    "--set", "autoscaling.metricsSource=off",
]  # fmt: skip


# ---------------------------------------------------------------------------
# The operator process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OperatorProcess:
    identity: str
    process: subprocess.Popen[bytes]
    log_path: Path
    health_port: int

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"operator {self.identity} exited ({self.process.returncode}):\n"
                        f"{self.log_tail()}")  # fmt: skip
        try:
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def eventually(self, probe: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        """Poll ``probe``; on timeout, fail with the operator's log tail."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; operator log:\n"
                            f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.3)


def start_operator(
    deployment: dict[str, Any], kubeconfig: Path, workdir: Path, identity: str
) -> OperatorProcess:
    """Run what the chart's Deployment runs: same arguments, its ServiceAccount's token."""
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tandem", "operator"]
    port = _free_port()
    args = [a.replace("$(POD_NAME)", identity) for a in container["args"]]
    args += [f"--kubeconfig={kubeconfig}", "--health-host=127.0.0.1", f"--health-port={port}"]
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTHONPATH")}
    env.update(POD_NAMESPACE=NAMESPACE, POD_NAME=identity, PYTHONUNBUFFERED="1")
    log_path = workdir / f"operator-{identity}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "operator", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,  # not the repo root: its operator/ would shadow the stdlib module
            env=env,
            start_new_session=True,
        )
    return OperatorProcess(identity, process, log_path, port)


@pytest.fixture(scope="module")
def kubectl(kubeconfig: Path) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture(scope="module")
def helm(kubeconfig: Path) -> Helm:
    return Helm(install_helm(), kubeconfig)


@pytest.fixture(scope="module")
def release(helm: Helm, kubectl: Kubectl) -> Iterator[list[dict[str, Any]]]:
    """The chart installed; its manifest."""
    if kubectl.find("namespace", NAMESPACE) is None:
        kubectl.run("create", "namespace", NAMESPACE)
    helm.run("upgrade", "--install", RELEASE, str(CHART), "--namespace", NAMESPACE, *VALUES)
    manifest = helm.run("get", "manifest", RELEASE, "--namespace", NAMESPACE).stdout
    yield [d for d in yaml.safe_load_all(manifest) if d]
    helm.run("uninstall", RELEASE, "--namespace", NAMESPACE, check=False)


@pytest.fixture(scope="module")
def deployment(release: list[dict[str, Any]]) -> dict[str, Any]:
    return find_doc(release, "Deployment", "-operator")


@pytest.fixture(scope="module")
def service_account(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["spec"]["serviceAccountName"])


@pytest.fixture(scope="module")
def sa_kubeconfig(
    kubeconfig: Path,
    kubectl: Kubectl,
    service_account: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A kubeconfig holding a token of the chart's ServiceAccount: its rights, no more."""
    token = kubectl.run(
        "-n", NAMESPACE, "create", "token", service_account, "--duration=2h"
    ).stdout.strip()  # fmt: skip
    admin = yaml.safe_load(kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "e2e", "user": service_account,
                                                      "namespace": NAMESPACE}}],
        "current-context": "operator",
    }  # fmt: skip
    path = tmp_path_factory.mktemp("operator") / "operator.kubeconfig"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("operator-run")


def lease_holder(kubectl: Kubectl, deployment: dict[str, Any]) -> str | None:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    name = next(a.split("=", 1)[1] for a in args if a.startswith("--lease-name="))
    lease = kubectl.find("-n", NAMESPACE, "lease", name)
    return None if lease is None else str(lease["spec"].get("holderIdentity") or "")


@pytest.fixture(scope="module")
def operator(
    deployment: dict[str, Any], sa_kubeconfig: Path, workdir: Path, kubectl: Kubectl
) -> Iterator[OperatorProcess]:
    op = start_operator(deployment, sa_kubeconfig, workdir, "e2e-1")
    try:
        op.eventually(op.ready, "the operator's /readyz")
        op.eventually(lambda: lease_holder(kubectl, deployment) == "e2e-1", "it to lead")
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="module")
def plan_settings(deployment: dict[str, Any]) -> planning.PlanSettings:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    image = next(a.split("=", 1)[1] for a in args if a.startswith("--router-image="))
    return planning.PlanSettings(router_image=image)


# ---------------------------------------------------------------------------
# Looking at pools


def pool_ref(manifest: Path) -> tuple[str, str]:
    doc = yaml.safe_load(manifest.read_text())
    return doc["metadata"].get("namespace", "default"), doc["metadata"]["name"]


def children(kubectl: Kubectl, namespace: str, name: str) -> dict[tuple[str, str], Any]:
    items = kubectl.json("-n", namespace, "get", CHILD_KINDS, "-l",
                         f"{planning.LABEL_POOL}={name}", "--show-managed-fields")["items"]  # fmt: skip
    return {(i["kind"], i["metadata"]["name"]): i for i in items}


def pool_events(kubectl: Kubectl, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json(
        "-n", namespace, "get", "events", "--field-selector",
        f"involvedObject.kind=InferencePool,involvedObject.name={name}",
    )["items"]  # fmt: skip
    return items


def has_event(kubectl: Kubectl, namespace: str, name: str, reason: str, text: str) -> bool:
    return any(e["reason"] == reason and text in e["message"]
               for e in pool_events(kubectl, namespace, name))  # fmt: skip


def condition(pool: dict[str, Any], kind: str) -> dict[str, Any]:
    conds = (pool.get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == kind), {})


def matches_plan(
    kubectl: Kubectl, namespace: str, name: str, settings: planning.PlanSettings
) -> bool:
    """Every planned child exists with the planned fields, and nothing else does."""
    body = kubectl.find("-n", namespace, "inferencepool", name)
    if body is None:
        return False
    pool = validation.parse_pool(body)
    desired = {applying.key(o): o for o in planning.plan(pool, settings)}
    live = children(kubectl, namespace, name)
    if set(live) != set(desired):
        return False
    for k, obj in desired.items():
        if not applying.is_subset(applying.prepare(obj, live[k]), live[k]):
            return False
        if applying.controller_uid(live[k]) != body["metadata"]["uid"]:
            return False
    return True


def stable_snapshot(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    """Children's resourceVersions and the pool's generation, once Deployments settled."""
    live = children(kubectl, namespace, name)
    for obj in live.values():
        if obj["kind"] == "Deployment":
            status = obj.get("status") or {}
            if status.get("observedGeneration") != obj["metadata"]["generation"]:
                return None
            if status.get("replicas", 0) != obj["spec"]["replicas"]:
                return None
    pool = kubectl.json("-n", namespace, "get", "inferencepool", name)
    if (pool.get("status") or {}).get("observedGeneration") != pool["metadata"]["generation"]:
        return None
    snapshot = {f"{k[0]}/{k[1]}": o["metadata"]["resourceVersion"] for k, o in live.items()}
    snapshot["pool generation"] = pool["metadata"]["generation"]
    return snapshot


# ---------------------------------------------------------------------------
# Tests


def test_operator_leads_as_its_service_account(
    operator: OperatorProcess, sa_kubeconfig: Path, service_account: str
) -> None:
    who = Kubectl(sa_kubeconfig).json("auth", "whoami")
    assert who["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{NAMESPACE}:{service_account}"
    )
    assert operator.ready()


@pytest.mark.parametrize(
    ("verb", "resource", "namespace"),
    [
        ("get", "secrets", "default"),
        ("delete", "inferencepools.tandem.dev", "default"),
        ("update", "inferencepools.tandem.dev", "default"),
        ("create", "pods", "default"),
        ("update", "leases.coordination.k8s.io/somebody-elses", NAMESPACE),
        ("create", "clusterroles.rbac.authorization.k8s.io", ""),
        ("escalate", "roles.rbac.authorization.k8s.io", "default"),
        ("bind", "roles.rbac.authorization.k8s.io", "default"),
        ("list", "customresourcedefinitions.apiextensions.k8s.io", ""),
    ],
)
def test_service_account_can_do_no_more(
    sa_kubeconfig: Path, verb: str, resource: str, namespace: str
) -> None:
    where = ["-n", namespace] if namespace else []
    result = Kubectl(sa_kubeconfig).run("auth", "can-i", verb, resource, *where, check=False)
    assert result.stdout.strip() == "no"


def test_examples_are_reconciled(
    operator: OperatorProcess, kubectl: Kubectl, plan_settings: planning.PlanSettings
) -> None:
    for manifest in EXAMPLES:
        namespace, name = pool_ref(manifest)
        if kubectl.find("namespace", namespace) is None:
            kubectl.run("create", "namespace", namespace)
        kubectl.run("apply", "--server-side", "-f", str(manifest))
    for manifest in EXAMPLES:
        namespace, name = pool_ref(manifest)
        operator.eventually(
            lambda: matches_plan(kubectl, namespace, name, plan_settings),  # noqa: B023
            f"the children of {namespace}/{name} to match the plan",
        )
        pool = validation.parse_pool(kubectl.json("-n", namespace, "get", "inferencepool", name))
        live = children(kubectl, namespace, name)
        for role in pool.roles():
            spec = pool.spec.prefill if role == "prefill" else pool.spec.decode
            worker = live[("Deployment", planning.name_of(pool, role))]
            assert worker["spec"]["replicas"] == spec.replicas.min
            # The operator let go of replicas: the autoscaler's field manager owns them.
            owners = {e["manager"] for e in worker["metadata"]["managedFields"]
                      if applying.owns_replicas(e)}  # fmt: skip
            assert owners == {applying.AUTOSCALER_FIELD_MANAGER}

        def status_reported() -> Any:
            body = kubectl.json("-n", namespace, "get", "inferencepool", name)  # noqa: B023
            status = body.get("status") or {}
            gen = body["metadata"]["generation"]
            conds = [condition(body, t) for t in ("Ready", "Progressing", "Degraded")]
            if status.get("observedGeneration") != gen or not all(conds):
                return None
            return status if all(c["observedGeneration"] == gen for c in conds) else None

        status = operator.eventually(status_reported, f"the status of {namespace}/{name}")
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False"  # no kubelet: nothing ever runs
        assert ready["reason"].endswith("NotReady")
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "False"
        assert status["decode"]["summary"] == f"0/{pool.spec.decode.replicas.min}"
        assert status["endpoint"] == planning.endpoint(pool)
        operator.eventually(
            lambda: has_event(kubectl, namespace, name, "Created", "Created Deployment"),  # noqa: B023
            f"a Created event on {namespace}/{name}",
        )


def test_printer_columns(kubectl: Kubectl) -> None:
    out = kubectl.run("get", "inferencepools", "--all-namespaces").stdout
    header = out.splitlines()[0].split()
    assert header[:5] == ["NAMESPACE", "NAME", "MODE", "PREFILL", "DECODE"]
    assert "TTFT" in header
    assert "TPOT" in header
    tiny = next(line.split() for line in out.splitlines() if line.split()[1] == "tiny")
    assert tiny[2:5] == ["disaggregated", "0/1", "0/1"]


def test_applying_the_same_manifests_again_changes_nothing(
    operator: OperatorProcess, kubectl: Kubectl
) -> None:
    refs = [pool_ref(m) for m in EXAMPLES]

    def snapshots() -> list[dict[str, Any]] | None:
        snaps = [stable_snapshot(kubectl, ns, name) for ns, name in refs]
        return None if any(s is None for s in snaps) else snaps  # type: ignore[return-value]

    before = operator.eventually(snapshots, "the Deployments to settle")
    for manifest in EXAMPLES:
        kubectl.run("apply", "--server-side", "-f", str(manifest))
    time.sleep(2 * RESYNC + 1)  # two drift checks and every watch event pass by
    assert snapshots() == before
    for manifest in EXAMPLES:
        for mode in (["--server-side"], []):
            diff = kubectl.run("diff", *mode, "-f", str(manifest), check=False)
            assert diff.returncode == 0, diff.stdout + diff.stderr


def test_a_child_edited_by_hand_is_restored(operator: OperatorProcess, kubectl: Kubectl) -> None:
    kubectl.run("set", "image", "deployment/tiny-decode", "vllm=registry.invalid/evil:1")
    kubectl.run("patch", "configmap", "tiny-router", "--type=merge",
                "-p", '{"data": {"router.json": "{}"}}')  # fmt: skip
    # Without its label the child is out of the watch's sight: the resync finds it by name.
    kubectl.run("label", "service", "tiny-decode", f"{planning.LABEL_POOL}-")

    def image() -> str:
        d = kubectl.json("get", "deployment", "tiny-decode")
        return str(d["spec"]["template"]["spec"]["containers"][0]["image"])

    wanted = validation.load_pools(ROOT / "examples" / "tiny.yaml")[0].spec.engine.image
    operator.eventually(lambda: image() == wanted, "the image to be restored")
    operator.eventually(
        lambda: kubectl.json("get", "configmap", "tiny-router")["data"]["router.json"] != "{}",
        "the router config to be restored",
    )
    operator.eventually(
        lambda: kubectl.json("get", "service", "tiny-decode")["metadata"]["labels"].get(
            planning.LABEL_POOL
        ) == "tiny",
        "the label to be restored",
    )  # fmt: skip
    operator.eventually(
        lambda: has_event(
            kubectl, "default", "tiny", "Restored", "Restored Deployment tiny-decode"
        ),
        "a Restored event",
    )


def test_a_deleted_child_is_recreated(operator: OperatorProcess, kubectl: Kubectl) -> None:
    uids = {
        kind: kubectl.json("get", kind, name)["metadata"]["uid"]
        for kind, name in (("service", "tiny-prefill"), ("deployment", "tiny-router"))
    }
    kubectl.run("delete", "service", "tiny-prefill")
    kubectl.run("delete", "deployment", "tiny-router")
    for kind, name in (("service", "tiny-prefill"), ("deployment", "tiny-router")):

        def recreated(kind: str = kind, name: str = name) -> bool:
            found = kubectl.find(kind, name)
            return found is not None and found["metadata"]["uid"] != uids[kind]

        operator.eventually(recreated, f"{kind} {name} to be recreated")


def test_worker_replicas_belong_to_the_autoscaler(
    operator: OperatorProcess, kubectl: Kubectl
) -> None:
    # The autoscaler applies spec.replicas under its own field manager: no conflict.
    scaled = {"apiVersion": "apps/v1", "kind": "Deployment",
              "metadata": {"name": "tiny-decode", "namespace": "default"},
              "spec": {"replicas": 2}}  # fmt: skip
    kubectl.run("apply", "--server-side", f"--field-manager={applying.AUTOSCALER_FIELD_MANAGER}",
                "-f", "-", stdin=json.dumps(scaled))  # fmt: skip
    # HPA and KEDA go through the scale subresource.
    kubectl.run("scale", "deployment/tiny-prefill", "--replicas=3")
    # A spec change makes the operator apply the workers again ...
    kubectl.run("patch", "inferencepool", "tiny", "--type=merge",
                "-p", '{"spec": {"engine": {"extraArgs": ["--seed=7"]}}}')  # fmt: skip

    def applied() -> bool:
        d = kubectl.json("get", "deployment", "tiny-decode")
        return "--seed=7" in d["spec"]["template"]["spec"]["containers"][0]["args"]

    operator.eventually(applied, "the spec change to reach the decode workers")
    time.sleep(RESYNC + 1)
    # ... and leaves replicas alone.
    assert kubectl.json("get", "deployment", "tiny-decode")["spec"]["replicas"] == 2
    assert kubectl.json("get", "deployment", "tiny-prefill")["spec"]["replicas"] == 3
    for name in ("tiny-decode", "tiny-prefill"):
        d = kubectl.json("get", "deployment", name, "--show-managed-fields")
        assert not any(
            e["manager"] == applying.FIELD_MANAGER and applying.owns_replicas(e)
            for e in d["metadata"]["managedFields"]
        ), name
    operator.eventually(
        lambda: (
            kubectl.json("get", "inferencepool", "tiny")["status"]["decode"]["summary"] == "0/2"
        ),
        "status to show the new desired replicas",
    )


def test_switching_to_aggregated_prunes_the_prefill_pool(
    operator: OperatorProcess, kubectl: Kubectl, plan_settings: planning.PlanSettings
) -> None:
    kubectl.run("patch", "inferencepool", "tiny", "--type=merge",
                "-p", '{"spec": {"mode": "aggregated"}}')  # fmt: skip
    operator.eventually(
        lambda: matches_plan(kubectl, "default", "tiny", plan_settings),
        "the prefill pool to be pruned",
    )
    live = children(kubectl, "default", "tiny")
    assert not [k for k in live if k[1] == "tiny-prefill"]
    config = json.loads(live[("ConfigMap", "tiny-router")]["data"]["router.json"])
    assert config["mode"] == "aggregated"
    assert config["discovery"]["prefillService"] is None
    operator.eventually(
        lambda: has_event(kubectl, "default", "tiny", "Deleted", "Deleted Deployment tiny-prefill"),
        "a Deleted event",
    )
    operator.eventually(
        lambda: kubectl.json("get", "inferencepool", "tiny")["status"]["prefill"]["summary"] == "-",
        "status to show no prefill pool",
    )
    kubectl.run("patch", "inferencepool", "tiny", "--type=merge",
                "-p", '{"spec": {"mode": "disaggregated"}}')  # fmt: skip
    operator.eventually(
        lambda: matches_plan(kubectl, "default", "tiny", plan_settings),
        "the prefill pool to come back",
    )


def test_a_strangers_object_is_not_adopted(
    operator: OperatorProcess, kubectl: Kubectl, plan_settings: planning.PlanSettings
) -> None:
    ns = kubectl.namespace("stranger")
    try:
        kubectl.run("-n", ns, "create", "service", "clusterip", "p1", "--tcp=80:80")
        doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
        doc["metadata"] = {"name": "p1", "namespace": ns}
        kubectl.run("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump(doc))

        def conflict() -> bool:
            d = condition(kubectl.json("-n", ns, "get", "inferencepool", "p1"), "Degraded")
            return d.get("status") == "True" and d.get("reason") == "ChildConflict"

        operator.eventually(conflict, "Degraded=True ChildConflict")
        theirs = kubectl.json("-n", ns, "get", "service", "p1")
        assert not theirs["metadata"].get("ownerReferences")
        assert applying.ANNOTATION_APPLIED_HASH not in (theirs["metadata"].get("annotations") or {})
        assert ("Deployment", "p1-decode") in children(kubectl, ns, "p1")
        operator.eventually(
            lambda: has_event(kubectl, ns, "p1", "ChildConflict", f"Service {ns}/p1"),
            "a ChildConflict warning",
        )
        kubectl.run("-n", ns, "delete", "service", "p1")
        operator.eventually(
            lambda: matches_plan(kubectl, ns, "p1", plan_settings), "the Service to be created"
        )
        operator.eventually(
            lambda: condition(kubectl.json("-n", ns, "get", "inferencepool", "p1"),
                              "Degraded").get("status") == "False",
            "Degraded=False",
        )  # fmt: skip
    finally:
        kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


def test_deleting_a_pool_deletes_its_children(operator: OperatorProcess, kubectl: Kubectl) -> None:
    for manifest in EXAMPLES:
        namespace, name = pool_ref(manifest)
        assert children(kubectl, namespace, name)
        kubectl.run("-n", namespace, "delete", "inferencepool", name, "--wait=false")
    for manifest in EXAMPLES:
        namespace, name = pool_ref(manifest)
        selector = f"{planning.LABEL_POOL}={name}"
        operator.eventually(
            lambda: not kubectl.json("-n", namespace, "get",  # noqa: B023
                                     f"{CHILD_KINDS},replicasets,pods", "-l", selector)["items"],  # noqa: B023
            f"the garbage collector to delete the children of {namespace}/{name}",
            # The controller-manager's garbage collector works through pods,
            # ReplicaSets and Deployments in turn; on 2 busy cores that took
            # over 60 s once in CI.
            timeout=3 * WAIT,
        )  # fmt: skip


def test_a_second_replica_waits_then_takes_over(
    operator: OperatorProcess,
    deployment: dict[str, Any],
    sa_kubeconfig: Path,
    workdir: Path,
    kubectl: Kubectl,
    plan_settings: planning.PlanSettings,
) -> None:
    second = start_operator(deployment, sa_kubeconfig, workdir, "e2e-2")
    ns = kubectl.namespace("ha")
    try:
        second.eventually(second.ready, "the standby's /readyz")
        second.eventually(lambda: "Waiting to lead" in second.log_tail(), "the standby to wait")
        doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
        doc["metadata"] = {"name": "ha", "namespace": ns}
        kubectl.run("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump(doc))
        operator.eventually(lambda: matches_plan(kubectl, ns, "ha", plan_settings), "pool ha")
        assert lease_holder(kubectl, deployment) == "e2e-1"
        assert "Reconcil" not in second.log_tail(200)
        assert "Created" not in second.log_tail(200)

        assert operator.stop() == 0
        assert "Released the Lease" in operator.log_tail()
        second.eventually(lambda: lease_holder(kubectl, deployment) == "e2e-2", "a takeover")
        kubectl.run("-n", ns, "patch", "inferencepool", "ha", "--type=merge",
                    "-p", '{"spec": {"router": {"replicas": 2}}}')  # fmt: skip
        second.eventually(
            lambda: (
                kubectl.json("-n", ns, "get", "deployment", "ha-router")["spec"]["replicas"] == 2
            ),
            "the new leader to reconcile",
        )
    finally:
        assert second.stop() == 0, second.log_tail()
        kubectl.run("delete", "namespace", ns, "--wait=false", check=False)

"""The operator's autoscaler against a real API server and a real Prometheus.

The chart is installed with ``planner.prometheusUrl``; the operator runs as
a subprocess with its ServiceAccount's token (as in e2e/k8s/test_operator.py).
The pool's worker Pods are run by the stand-in kubelet of ``conftest.py`` as
engine emulators (``--time-scale 0.2``: five times slower than the emulated
H100, so a handful of clients make real pressure on two cores, while the
metrics stay in GPU seconds). A test-sized pool: ticks every second, a 5 s
window, 3 s scale-up and 8 s scale-down stabilization.

Tests run in file order on one pool: long prompts scale prefill (not decode),
idle brings it back to min, long generations scale decode, Prometheus stopped
holds the size and says so, and once it is back the idle pool returns to min.
The decision latency (SLO breach first visible in Prometheus → Deployment
replicas changed) is printed at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.autoscaling.conftest import Kubelet, Load, Prometheus
from e2e.k8s.test_helm import CHART, Helm, Kubectl, find_doc, install_helm
from e2e.k8s.test_operator import NAMESPACE, VALUES, OperatorProcess, lease_holder, start_operator
from tandem.autoscaling import prometheus

POOL_NS = "autoscale"
POOL = "auto"
MODEL = "tiny"
TTFT_SLO = 0.15
KV_TARGET = 0.8  # PlannerSpec.kv_target
WINDOW, WARMUP = 5.0, 2.0
TIME_SCALE = "0.2"
DECODE_BLOCKS = "600"  # 9600 tokens of KV per decode worker
MANIFEST: dict[str, Any] = {
    "apiVersion": "tandem.dev/v1alpha1",
    "kind": "InferencePool",
    "metadata": {"name": POOL, "namespace": POOL_NS},
    "spec": {
        "model": {"name": "tandem/tiny-llama", "servedName": MODEL},
        "mode": "disaggregated",
        "prefill": {"replicas": {"min": 1, "max": 3}},
        "decode": {"replicas": {"min": 1, "max": 3}},
        "slo": {"ttft": f"{round(TTFT_SLO * 1000)}ms", "tpot": "50ms", "percentile": 90},
        "autoscaling": {
            "policy": "slo",
            "interval": "1s",
            "window": f"{WINDOW:g}s",
            "warmup": f"{WARMUP:g}s",
            "scaleUpStabilization": "3s",
            "scaleDownStabilization": "8s",
            "maxScaleUpStep": 1,
        },
    },
}
WAIT = 90.0
LATENCIES: dict[str, float] = {}


def _say(request: pytest.FixtureRequest, message: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(message)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"autoscaling: {message}")


@pytest.fixture(scope="module")
def kubectl(kubeconfig: Path) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture(scope="module")
def operator(
    kubeconfig: Path,
    kubectl: Kubectl,
    prometheus: Prometheus,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The chart installed with the Prometheus URL, and its operator running."""
    helm = Helm(install_helm(), kubeconfig)
    if kubectl.find("namespace", NAMESPACE) is None:
        kubectl.run("create", "namespace", NAMESPACE)
    helm.run("upgrade", "--install", "tandem", str(CHART), "--namespace", NAMESPACE, *VALUES,
             "--set", "autoscaling.metricsSource=prometheus",
             "--set", f"autoscaling.prometheusUrl={prometheus.url}",
             "--set", "autoscaling.prometheusTimeout=2")  # fmt: skip
    manifest = helm.run("get", "manifest", "tandem", "--namespace", NAMESPACE).stdout
    deployment = find_doc([d for d in yaml.safe_load_all(manifest) if d], "Deployment", "-operator")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--prometheus-url={prometheus.url}" in args
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = kubectl.run("-n", NAMESPACE, "create", "token", account, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(kubeconfig.read_text())
    workdir = tmp_path_factory.mktemp("autoscaling-operator")
    sa_kubeconfig = workdir / "operator.kubeconfig"
    sa_kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "op", "context": {"cluster": "e2e", "user": account,
                                                "namespace": NAMESPACE}}],
        "current-context": "op",
    }))  # fmt: skip
    op = start_operator(deployment, sa_kubeconfig, workdir, "autoscaler-1")
    try:
        op.eventually(op.ready, "the operator's /readyz")
        op.eventually(lambda: lease_holder(kubectl, deployment) == "autoscaler-1", "it to lead")
        yield op
    finally:
        op.stop()
        helm.run("uninstall", "tandem", "--namespace", NAMESPACE, check=False)


@pytest.fixture(scope="module")
def kubelet(
    kubeconfig: Path,
    kubectl: Kubectl,
    prometheus: Prometheus,
    operator: OperatorProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Kubelet]:
    """The pool applied, and its worker Pods run as emulators."""
    if kubectl.find("namespace", POOL_NS) is None:
        kubectl.run("create", "namespace", POOL_NS)
    common = ["--served-model-name", MODEL, "--time-scale", TIME_SCALE]
    runner = Kubelet(
        kubeconfig, POOL_NS, POOL, prometheus, tmp_path_factory.mktemp("workers"),
        {"prefill": common, "decode": [*common, "--num-gpu-blocks-override", DECODE_BLOCKS]},
    )  # fmt: skip
    try:
        kubectl.run("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump(MANIFEST))
        operator.eventually(
            lambda: runner.urls("prefill") and runner.urls("decode"), "one ready worker per role"
        )
        yield runner
    finally:
        kubectl.run("-n", POOL_NS, "delete", "inferencepool", POOL, "--wait=false", check=False)
        runner.close()
        assert not runner.errors, runner.errors


def _condition(kubelet: Kubelet, kind: str) -> dict[str, Any]:
    conds = (kubelet.pool_object().get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == kind), {})


def _promql(role: str, signal: str) -> str:
    selector = f'pool="{POOL}",role="{role}",namespace="{POOL_NS}"'
    return prometheus.queries(selector, role, 90, WINDOW, WARMUP)[signal]  # type: ignore[arg-type]


def _breach_to_scale(
    kubelet: Kubelet,
    operator: OperatorProcess,
    role: str,
    breached: Callable[[], bool],
    before: int,
    timeout: float = WAIT,
) -> tuple[float, float]:
    """Poll until the Deployment grows: (seconds from load start to the first breach
    seen in Prometheus, seconds from that breach to the replicas changing)."""
    start = time.monotonic()
    breach: float | None = None
    while time.monotonic() - start < timeout:
        now = time.monotonic()
        if breach is None and breached():
            breach = now
        if kubelet.replicas(f"{POOL}-{role}") > before:
            assert breach is not None, f"{role} scaled before any breach was visible"
            return breach - start, now - breach
        time.sleep(0.25)
    pytest.fail(f"{role} did not scale up in {timeout:.0f} s; operator log:\n"
                f"{operator.log_tail(80)}")  # fmt: skip


def test_long_prompts_scale_prefill_not_decode(
    kubelet: Kubelet, operator: OperatorProcess, request: pytest.FixtureRequest
) -> None:
    assert (kubelet.replicas(f"{POOL}-prefill"), kubelet.replicas(f"{POOL}-decode")) == (1, 1)
    operator.eventually(
        lambda: _condition(kubelet, "MetricsAvailable").get("status") == "True",
        "MetricsAvailable=True",
    )
    ttft = _promql("prefill", "ttft")
    load = Load(kubelet, MODEL, streams=4, prompt_tokens=2000, max_tokens=4)
    try:
        to_breach, latency = _breach_to_scale(
            kubelet,
            operator,
            "prefill",
            lambda: (kubelet.prometheus.query(ttft) or 0) > TTFT_SLO,
            1,
        )
        LATENCIES["prefill (TTFT)"] = latency
        _say(request, f"prefill: TTFT breach seen {to_breach:.1f} s after the load began; "
                      f"replicas changed {latency:.1f} s after the breach")  # fmt: skip
        operator.eventually(
            lambda: any(r == "ScaledUp" and m.startswith("prefill 1→2: ")
                        for r, m in kubelet.events()),
            "a ScaledUp event for prefill",
        )  # fmt: skip
        time.sleep(10)  # the load goes on: decode feels no pressure
        assert kubelet.replicas(f"{POOL}-decode") == 1
        assert load.done > 0
    finally:
        load.stop()
        load.join()
    status = kubelet.pool_object()["status"]
    last = status["prefill"]["lastDecision"]
    assert last["fromReplicas"] < last["toReplicas"]
    assert last["reason"]
    assert "lastDecision" not in status.get("decode", {})


def test_idle_returns_to_min(kubelet: Kubelet, operator: OperatorProcess) -> None:
    operator.eventually(
        lambda: (
            kubelet.replicas(f"{POOL}-prefill") == 1 and kubelet.replicas(f"{POOL}-decode") == 1
        ),
        "both pools back to replicas.min",
    )
    # The autoscaler (the only writer of replicas) records why prefill came back down;
    # its Events are checked on the way up, and can be aggregated by the API server.
    last = kubelet.pool_object()["status"]["prefill"]["lastDecision"]
    assert last["toReplicas"] == 1, last
    assert last["fromReplicas"] > 1, last
    assert last["reason"], last
    operator.eventually(lambda: len(kubelet.urls("prefill")) == 1, "the extra worker to go")


def test_long_generations_scale_decode(
    kubelet: Kubelet, operator: OperatorProcess, request: pytest.FixtureRequest
) -> None:
    kv = _promql("decode", "kv_usage")
    load = Load(kubelet, MODEL, streams=20, prompt_tokens=256, max_tokens=400)
    try:
        to_breach, latency = _breach_to_scale(
            kubelet, operator, "decode", lambda: (kubelet.prometheus.query(kv) or 0) > KV_TARGET, 1
        )
        LATENCIES["decode (KV usage)"] = latency
        _say(request, f"decode: KV usage past {KV_TARGET:.0%} seen {to_breach:.1f} s after the "
                      f"load began; replicas changed {latency:.1f} s after")  # fmt: skip
        operator.eventually(
            lambda: any(
                r == "ScaledUp" and m.startswith("decode 1→2") for r, m in kubelet.events()
            ),
            "a ScaledUp event for decode",
        )
        last = kubelet.pool_object()["status"]["decode"]["lastDecision"]
        assert (last["fromReplicas"], last["toReplicas"]) == (1, 2)
        operator.eventually(lambda: len(kubelet.urls("decode")) == 2, "the new decode worker")
    finally:
        load.stop()  # without waiting for the generations in flight: the next test begins now


def test_prometheus_down_holds_replicas(kubelet: Kubelet, operator: OperatorProcess) -> None:
    held = kubelet.replicas(f"{POOL}-decode")
    assert held == 2
    kubelet.prometheus.stop()
    operator.eventually(
        lambda: _condition(kubelet, "MetricsAvailable").get("reason") == "PrometheusUnreachable",
        "MetricsAvailable=False PrometheusUnreachable",
    )
    cond = _condition(kubelet, "MetricsAvailable")
    assert cond["status"] == "False"
    assert "holding the current replicas" in cond["message"]
    # Idle and blind for longer than the scale-down stabilization and the window: held.
    time.sleep(8 + WINDOW + 2)
    assert kubelet.replicas(f"{POOL}-decode") == held
    assert any(r == "PrometheusUnreachable" for r, _ in kubelet.events())


def test_back_to_min_once_prometheus_returns(
    kubelet: Kubelet, operator: OperatorProcess, request: pytest.FixtureRequest
) -> None:
    kubelet.prometheus.start()
    operator.eventually(
        lambda: _condition(kubelet, "MetricsAvailable").get("status") == "True",
        "MetricsAvailable=True again",
    )
    operator.eventually(lambda: kubelet.replicas(f"{POOL}-decode") == 1, "decode back to min")
    _say(request, "decision latency (breach seen in Prometheus → replicas changed): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in LATENCIES.items()))  # fmt: skip

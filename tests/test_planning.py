"""plan(pool): the objects the operator creates, checked offline against Kubernetes' schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tandem.operator import api, planning, validation

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _pool(mode: str = "disaggregated", uid: str | None = None, **spec: Any) -> api.InferencePool:
    meta: dict[str, Any] = {"name": "p", "namespace": "ns"}
    if uid:
        meta["uid"] = uid
    return api.InferencePool.model_validate(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": meta,
         "spec": {"model": {"name": "m"}, "mode": mode, **spec}}
    )  # fmt: skip


def _by(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _args(deployment: dict[str, Any]) -> list[str]:
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_rendered_object_is_valid_kubernetes(path: Path) -> None:
    (pool,) = validation.load_pools(path)
    objects = planning.plan(pool)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_disaggregated_pool_has_every_child() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in planning.plan(_pool()))
    assert kinds == [
        ("ConfigMap", "p-router"),
        ("Deployment", "p-decode"),
        ("Deployment", "p-prefill"),
        ("Deployment", "p-router"),
        ("PodDisruptionBudget", "p-decode"),
        ("PodDisruptionBudget", "p-prefill"),
        ("PodDisruptionBudget", "p-router"),
        ("Role", "p-router"),
        ("RoleBinding", "p-router"),
        ("Service", "p"),
        ("Service", "p-decode"),
        ("Service", "p-prefill"),
        ("ServiceAccount", "p-router"),
    ]


def test_aggregated_pool_runs_no_prefill_and_no_connector() -> None:
    objects = planning.plan(_pool("aggregated"))
    assert not [o for o in objects if o["metadata"]["name"].endswith("-prefill")]
    assert "--kv-transfer-config" not in _args(_by(objects, "Deployment", "p-decode"))


def test_workers_get_nixl_and_their_own_batching() -> None:
    objects = planning.plan(
        _pool(prefill={"batching": {"maxNumBatchedTokens": 8192}, "tensorParallelSize": 2},
              decode={"batching": {"maxNumSeqs": 128}})
    )  # fmt: skip
    prefill = _args(_by(objects, "Deployment", "p-prefill"))
    decode = _args(_by(objects, "Deployment", "p-decode"))
    for args in (prefill, decode):
        config = json.loads(args[args.index("--kv-transfer-config") + 1])
        assert config["kv_connector"] == "NixlConnector"
        assert args[args.index("--served-model-name") + 1] == "m"
    assert prefill[prefill.index("--max-num-batched-tokens") + 1] == "8192"
    assert prefill[prefill.index("--tensor-parallel-size") + 1] == "2"
    assert "--max-num-seqs" not in prefill
    assert decode[decode.index("--max-num-seqs") + 1] == "128"


def test_worker_pods_are_hardened_and_probed() -> None:
    deployment = _by(planning.plan(_pool()), "Deployment", "p-decode")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert "preStop" in container["lifecycle"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    env = {e["name"]: e for e in container["env"]}
    assert (
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    )


def test_drain_script_is_valid_python() -> None:
    compile(planning.DRAIN_SCRIPT, "<preStop>", "exec")


def test_owner_references_only_with_a_uid() -> None:
    assert all("ownerReferences" not in o["metadata"] for o in planning.plan(_pool()))
    for obj in planning.plan(_pool(uid="1234")):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "tandem.dev/v1alpha1", "kind": "InferencePool",
                       "name": "p", "uid": "1234", "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def test_worker_replicas_start_at_min() -> None:
    objects = planning.plan(_pool(decode={"replicas": {"min": 3, "max": 5}}))
    assert _by(objects, "Deployment", "p-decode")["spec"]["replicas"] == 3


def test_router_rolls_only_when_its_config_changes() -> None:
    def config_hash(pool: api.InferencePool) -> str:
        router = _by(planning.plan(pool), "Deployment", "p-router")
        return str(
            router["spec"]["template"]["metadata"]["annotations"][planning.ANNOTATION_CONFIG_HASH]
        )

    base = config_hash(_pool())
    assert config_hash(_pool(slo={"ttft": "300ms"})) == base
    assert config_hash(_pool(router={"policy": "prefix-aware"})) != base


def test_slo_change_touches_no_pod_template() -> None:
    def templates(pool: api.InferencePool) -> list[Any]:
        return [o["spec"]["template"] for o in planning.plan(pool) if o["kind"] == "Deployment"]

    assert templates(_pool()) == templates(_pool(slo={"ttft": "250ms", "tpot": "20ms"}))


def test_router_config_names_the_worker_services() -> None:
    config = planning.router_config(_pool())
    assert config["discovery"] == {"kind": "kubernetes", "namespace": "ns", "port": 8000,
                                   "prefillService": "p-prefill", "decodeService": "p-decode"}  # fmt: skip
    assert planning.router_config(_pool("aggregated"))["discovery"]["prefillService"] is None


def test_pvc_is_mounted_read_only() -> None:
    pool = _pool(model={"name": "org/m", "pvc": "weights"})
    pod = _by(planning.plan(pool), "Deployment", "p-decode")["spec"]["template"]["spec"]
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    } in pod["volumes"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models"


def test_the_router_labels_its_metrics_with_the_pool_name() -> None:
    """The autoscaler matches the router's queue by ``pool``: the pool's name, not the
    served model name (which two pools may share)."""
    from tandem.router import settings as router_settings

    pool = _pool(model={"name": "org/shared-model", "servedName": "shared"})
    config = router_settings.RouterSettings.model_validate(planning.router_config(pool))
    assert (config.pool_label, config.served_model_name) == ("p", "shared")

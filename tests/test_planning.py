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
    assert config_hash(_pool(autoscaling={"interval": "30s"})) == base
    assert config_hash(_pool(router={"policy": "prefix-aware"})) != base
    # The router measures SLO attainment against the objectives: they are its config.
    assert config_hash(_pool(slo={"ttft": "300ms"})) != base


def test_slo_change_touches_no_worker_pod_template() -> None:
    def templates(pool: api.InferencePool) -> list[Any]:
        return [
            o["spec"]["template"]
            for o in planning.plan(pool)
            if o["kind"] == "Deployment" and not o["metadata"]["name"].endswith("-router")
        ]

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


def _worker(pool: api.InferencePool, role: str = "decode") -> dict[str, Any]:
    pod: dict[str, Any] = _by(planning.plan(pool), "Deployment", f"p-{role}")["spec"]["template"][
        "spec"
    ]
    return pod


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def test_worker_pods_run_on_a_read_only_root_filesystem() -> None:
    """DESIGN.md "vLLM in pods": HOME/USER set, caches and tmp on emptyDirs, /dev/shm big enough."""
    pod = _worker(_pool())
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] != 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"] == "shm"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env = _env(container)
    assert "emptyDir" in volumes[mounts[env["HOME"]["value"]]]
    assert env["USER"]["value"]
    for name in ("VLLM_CACHE_ROOT", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME"):
        assert env[name]["value"].startswith(env["HOME"]["value"] + "/") or (
            env[name]["value"] == env["HOME"]["value"]
        )
    for name in ("VLLM_HOST_IP", "VLLM_NIXL_SIDE_CHANNEL_HOST"):
        assert env[name]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"]["value"] == str(planning.NIXL_PORT) == "5600"


def test_cpu_pools_run_eager_with_a_cpu_kv_cache() -> None:
    cpu = _worker(_pool(engine={"kvBufferDevice": "cpu"}))["containers"][0]
    gpu = _worker(_pool())["containers"][0]
    assert "--enforce-eager" in cpu["args"]
    config = json.loads(cpu["args"][cpu["args"].index("--kv-transfer-config") + 1])
    assert config["kv_buffer_device"] == "cpu"
    assert _env(cpu)["VLLM_CPU_KVCACHE_SPACE"]["value"] == "1"
    assert "--enforce-eager" not in gpu["args"]
    assert "VLLM_CPU_KVCACHE_SPACE" not in _env(gpu)


def test_engine_env_overrides_ours_without_duplicates() -> None:
    """Server-side apply rejects an env list with one name twice."""
    pool = _pool(engine={"kvBufferDevice": "cpu",
                         "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "4"},
                                 {"name": "EXTRA", "value": "x"}]})  # fmt: skip
    names = [e["name"] for e in _worker(pool)["containers"][0]["env"]]
    assert len(names) == len(set(names))
    env = _env(_worker(pool)["containers"][0])
    assert env["VLLM_CPU_KVCACHE_SPACE"]["value"] == "4"
    assert env["EXTRA"]["value"] == "x"


def test_a_tiny_model_is_built_by_an_init_container_at_one_path() -> None:
    pool = _pool(model={"name": "tandem/tiny-llama"}, engine={"image": "engine:1"})
    paths = set()
    for role in ("prefill", "decode"):
        pod = _worker(pool, role)
        (init,) = pod["initContainers"]
        (container,) = pod["containers"]
        assert init["image"] == container["image"] == "engine:1"
        assert init["securityContext"]["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["model"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in container[
            "volumeMounts"
        ]
        args = container["args"]
        paths.add(args[args.index("--model") + 1])
        assert _env(container)["HF_HUB_OFFLINE"]["value"] == "1"
    # NIXL's compatibility hash includes --model: prefill and decode must agree.
    assert paths == {planning.TINY_MODEL_PATH}


def test_the_init_containers_script_builds_the_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tandem.workers import tinymodel

    dest = tmp_path / "models" / "tiny"
    command = [sys.executable, "-c", planning.TINY_MODEL_SCRIPT, str(dest)]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=120)
    assert (dest / tinymodel.MARKER).is_file()
    assert (dest / "config.json").is_file()
    before = (dest / "model.safetensors").stat().st_mtime_ns
    subprocess.run(command, check=True, cwd=tmp_path, timeout=120)  # a restart keeps it
    assert (dest / "model.safetensors").stat().st_mtime_ns == before


def test_a_hub_model_is_downloaded_not_offline() -> None:
    container = _worker(_pool(model={"name": "org/m"}))["containers"][0]
    args = container["args"]
    assert args[args.index("--model") + 1] == "org/m"
    assert "HF_HUB_OFFLINE" not in _env(container)
    assert "initContainers" not in _worker(_pool(model={"name": "org/m"}))


def test_the_router_has_a_writable_tmp_only() -> None:
    router = _by(planning.plan(_pool()), "Deployment", "p-router")["spec"]["template"]["spec"]
    (container,) = router["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in router["volumes"]}
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"] == "tmp"
    assert "emptyDir" in volumes["tmp"]


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ({"name": "org/m"}, "huggingFace"),
        ({"name": "org/m", "pvc": "weights"}, "pvc"),
        ({"name": "org/m", "hostPath": "/data/m"}, "hostPath"),
        ({"name": "org/m", "path": "/opt/weights"}, "image"),
        ({"name": "tandem/tiny-llama"}, "tiny"),
        ({"name": "tandem/tiny-llama", "path": "/opt/weights"}, "image"),
    ],
)
def test_each_model_source_is_recognised(model: dict[str, Any], kind: str) -> None:
    assert _pool(model=model).spec.model.source_kind == kind
    assert planning.model_source(_pool(model=model).spec.model).kind == kind


def test_a_host_path_is_mounted_read_only_at_models() -> None:
    pod = _worker(_pool(model={"name": "org/m", "hostPath": "/data/m", "path": "/models/v2"}))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/data/m", "type": "Directory"}
    (container,) = pod["containers"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert container["args"][container["args"].index("--model") + 1] == "/models/v2"
    assert _env(container)["HF_HUB_OFFLINE"]["value"] == "1"


def test_a_hub_model_gets_its_token_and_cache_claim() -> None:
    hub = {"tokenSecret": {"name": "hf", "key": "token"}, "cacheClaim": "hf-cache"}
    pod = _worker(_pool(model={"name": "org/m", "huggingFace": hub}))
    (container,) = pod["containers"]
    assert _env(container)["HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "hf", "key": "token"}
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["hf-cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["hf-cache"] == _env(container)["HF_HOME"]["value"]


@pytest.mark.parametrize(
    "model",
    [
        {"name": "org/m", "pvc": "w", "hostPath": "/data/m"},
        {"name": "org/m", "pvc": "w", "huggingFace": {"cacheClaim": "c"}},
        {"name": "tandem/tiny-llama", "huggingFace": {"cacheClaim": "c"}},
    ],
)
def test_one_source_of_weights_only(model: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="model\\."):
        _pool(model=model)


def test_the_router_gets_the_pools_migration_limit_and_slo() -> None:
    from tandem.router import settings as router_settings

    pool = _pool(router={"migrationLimit": 0}, slo={"ttft": "800ms", "tpot": "40ms"})
    config = router_settings.RouterSettings.model_validate(planning.router_config(pool))
    assert config.migration_limit == 0
    assert config.slo is not None
    assert (config.slo.ttft, config.slo.tpot) == (0.8, 0.04)

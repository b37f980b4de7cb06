"""``plan(pool) -> objects``: every Kubernetes object an InferencePool needs.

Pure: no I/O, no clock. ``tandem render`` prints its result; the operator
applies it with server-side apply. Worker Deployments carry ``spec.replicas``
(``replicas.min``) so a rendered manifest works on its own, but the operator
drops that field once a Deployment exists: from then on only the autoscaler
(or HPA/KEDA with ``policy: external``) writes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tandem import __version__, roles, vllm_metrics
from tandem.workers import vllm_args

from . import api

K8sObject = dict[str, Any]
WorkerRole = roles.Role

WORKER_PORT = 8000
NIXL_PORT = 5600
ROUTER_PORT = 8080
ROUTER_CONFIG_KEY = "router.json"
ROUTER_CONFIG_DIR = "/etc/tandem"

LABEL_POOL = "tandem.dev/pool"
LABEL_ROLE = "tandem.dev/role"
ANNOTATION_CONFIG_HASH = "tandem.dev/config-hash"
MANAGED_BY = "tandem-operator"

DEFAULT_ROUTER_IMAGE = f"ghcr.io/tandem-dev/tandem:{__version__}"

# Lets in-flight requests finish before vLLM gets SIGTERM: wait for the endpoint
# removal to reach the routers, then until the engine reports nothing running
# or waiting (bounded by the grace period).
DRAIN_GRACE_SECONDS = 120
DRAIN_SCRIPT = f"""\
import time, urllib.request
deadline = time.time() + {DRAIN_GRACE_SECONDS - 10}
time.sleep(5)
while time.time() < deadline:
    try:
        text = urllib.request.urlopen("http://127.0.0.1:{WORKER_PORT}/metrics", timeout=2).read().decode()
    except Exception:
        break
    busy = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("{vllm_metrics.NUM_REQUESTS_RUNNING}", "{vllm_metrics.NUM_REQUESTS_WAITING}")))
    if busy == 0:
        break
    time.sleep(1)
"""


@dataclass(frozen=True)
class PlanSettings:
    """Operator-wide settings the plan depends on."""

    router_image: str = DEFAULT_ROUTER_IMAGE
    """Image of the router (the Tandem image); a pool's router.image overrides it."""


def name_of(pool: api.InferencePool, component: str) -> str:
    return f"{pool.name}-{component}"


def labels(pool: api.InferencePool, component: str) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "tandem",
        "app.kubernetes.io/instance": pool.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_POOL: pool.name,
    }
    if component in ("prefill", "decode"):
        out[LABEL_ROLE] = component
    return out


def selector(pool: api.InferencePool, component: str) -> dict[str, str]:
    return {LABEL_POOL: pool.name, "app.kubernetes.io/component": component}


def endpoint(pool: api.InferencePool) -> str:
    return f"http://{pool.name}.{pool.namespace}.svc/v1"


def _metadata(pool: api.InferencePool, name: str, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": pool.namespace,
        "labels": labels(pool, component),
    }
    if pool.metadata.uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": pool.name,
                "uid": pool.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def engine_args(pool: api.InferencePool, role: WorkerRole) -> vllm_args.EngineArgs:
    spec = pool.spec
    role_spec = spec.prefill if role == "prefill" else spec.decode
    return vllm_args.EngineArgs(
        model=model_source(spec.model).path,
        served_name=spec.model.effective_served_name,
        port=WORKER_PORT,
        max_model_len=spec.model.max_model_len,
        dtype=spec.model.dtype,
        tensor_parallel_size=role_spec.tensor_parallel_size,
        max_num_seqs=role_spec.batching.max_num_seqs,
        max_num_batched_tokens=role_spec.batching.max_num_batched_tokens,
        kv_connector=spec.engine.kv_connector,
        kv_buffer_device=spec.engine.kv_buffer_device,
        # Graph capture buys nothing on the CPU and costs ~26 s per start.
        enforce_eager=spec.engine.kv_buffer_device == "cpu",
        gpu_memory_utilization=role_spec.gpu_memory_utilization,
        extra_args=(*spec.engine.extra_args, *role_spec.extra_args),
    )


def engine_role(pool: api.InferencePool, role: WorkerRole) -> vllm_args.Role:
    """The engine's role: decode workers of an aggregated pool need no connector."""
    return "aggregated" if pool.spec.mode == "aggregated" else role


def _resources(spec: api.ResourceRequirements) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if spec.requests:
        out["requests"] = dict(spec.requests)
    if spec.limits:
        out["limits"] = dict(spec.limits)
    return out


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}

MODELS_DIR = "/models"
"""Where a model volume (PVC, hostPath, the tiny model's emptyDir) is mounted."""
TINY_MODEL_PATH = f"{MODELS_DIR}/tiny"
"""One path for prefill and decode: NIXL's compatibility hash includes ``--model``."""
CACHE_DIR = "/cache"
"""HOME and every cache of a worker: an emptyDir (the root filesystem is read-only)."""
HF_HOME = f"{CACHE_DIR}/huggingface"
"""Hugging Face downloads; ``model.huggingFace.cacheClaim`` mounts a PVC here."""
CPU_KV_CACHE_GIB = 1
"""``VLLM_CPU_KVCACHE_SPACE`` of CPU pools unless ``engine.env`` sets it."""
SHM_SIZE_LIMIT = "1Gi"
"""vLLM's MultiprocExecutor ring buffer needs ~160 MiB of /dev/shm even at TP 1;
a sandbox has 64 MiB."""

TINY_MODEL_SCRIPT = (
    "import pathlib, sys\n"
    "from tandem.workers import tinymodel\n"
    "dest = pathlib.Path(sys.argv[1])\n"
    "if not (dest / tinymodel.MARKER).is_file():\n"
    "    tinymodel.build_tiny_model(dest)\n"
)
"""Run by the ``tiny-model`` init container (the engine image must hold the tandem
package, as ghcr.io/tandem-dev/tandem-vllm-cpu does); seed 0 gives every pod the
same bytes."""


@dataclass(frozen=True)
class ModelSource:
    """Where a worker finds its weights, as pod-spec pieces."""

    kind: api.ModelSourceKind
    path: str
    """The ``--model`` argument."""
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    env: tuple[dict[str, Any], ...] = ()
    offline: bool = True
    """Nothing to download: vLLM must not try a model hub."""
    builds_tiny_model: bool = False


def model_source(model: api.ModelSpec) -> ModelSource:
    """The volumes, mounts and environment that put the weights where ``--model`` says."""
    kind = model.source_kind
    read_only_mount = ({"name": "model", "mountPath": MODELS_DIR, "readOnly": True},)
    if kind == "pvc":
        claim = {"claimName": model.pvc, "readOnly": True}
        return ModelSource(
            kind, model.effective_path,
            volumes=({"name": "model", "persistentVolumeClaim": claim},), mounts=read_only_mount,
        )  # fmt: skip
    if kind == "hostPath":
        host = {"path": model.host_path, "type": "Directory"}
        return ModelSource(
            kind, model.effective_path,
            volumes=({"name": "model", "hostPath": host},), mounts=read_only_mount,
        )  # fmt: skip
    if kind == "tiny":
        return ModelSource(
            kind, TINY_MODEL_PATH,
            volumes=({"name": "model", "emptyDir": {"sizeLimit": "64Mi"}},), mounts=read_only_mount,
            builds_tiny_model=True,
        )  # fmt: skip
    if kind == "image":
        return ModelSource(kind, model.effective_path)
    hub = model.hugging_face or api.HuggingFaceSpec()
    env: tuple[dict[str, Any], ...] = ()
    if hub.token_secret is not None:
        ref = {"name": hub.token_secret.name, "key": hub.token_secret.key}
        env = ({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}},)
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    if hub.cache_claim:
        claim = {"claimName": hub.cache_claim}
        volumes = ({"name": "hf-cache", "persistentVolumeClaim": claim},)
        mounts = ({"name": "hf-cache", "mountPath": HF_HOME},)
    return ModelSource(kind, model.name, volumes, mounts, env, offline=False)


def _merge_env(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per name, a later group's winning (server-side apply rejects duplicates)."""
    merged: dict[str, dict[str, Any]] = {}
    for group in groups:
        for var in group:
            merged.pop(var["name"], None)
            merged[var["name"]] = var
    return list(merged.values())


def _pod_ip(name: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def worker_env(pool: api.InferencePool, source: ModelSource) -> list[dict[str, Any]]:
    """Addresses, caches on the writable volumes, and the user's ``engine.env`` last."""
    spec = pool.spec
    ours: list[dict[str, Any]] = [
        # vLLM advertises and NIXL's side channel binds the pod's own address.
        _pod_ip("VLLM_HOST_IP"),
        _pod_ip("VLLM_NIXL_SIDE_CHANNEL_HOST"),
        {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(NIXL_PORT)},
        # The image's uid may have no passwd entry: getpass and ~ need these.
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "USER", "value": "vllm"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "XDG_CONFIG_HOME", "value": f"{CACHE_DIR}/config"},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_DIR}/vllm"},
        {"name": "VLLM_CONFIG_ROOT", "value": f"{CACHE_DIR}/config/vllm"},
        {"name": "VLLM_RPC_BASE_PATH", "value": "/tmp"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_DIR}/torchinductor"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "NUMBA_CACHE_DIR", "value": f"{CACHE_DIR}/numba"},
        {"name": "OUTLINES_CACHE_DIR", "value": f"{CACHE_DIR}/outlines"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]  # fmt: skip
    if source.offline:
        ours += [{"name": "HF_HUB_OFFLINE", "value": "1"},
                 {"name": "TRANSFORMERS_OFFLINE", "value": "1"}]  # fmt: skip
    if spec.engine.kv_buffer_device == "cpu":
        ours.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(CPU_KV_CACHE_GIB)})
    ours += list(source.env)
    user = [{"name": e.name, "value": e.value} for e in spec.engine.env]
    return _merge_env(ours, user)


def _tiny_model_init(image: str) -> dict[str, Any]:
    return {
        "name": "tiny-model",
        "image": image,
        "command": ["python3", "-c", TINY_MODEL_SCRIPT, TINY_MODEL_PATH],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "USER", "value": "vllm"}],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "model", "mountPath": MODELS_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _CONTAINER_SECURITY,
    }  # fmt: skip


def worker_deployment(pool: api.InferencePool, role: WorkerRole) -> K8sObject:
    spec = pool.spec
    role_spec = spec.prefill if role == "prefill" else spec.decode
    source = model_source(spec.model)
    args = vllm_args.build_vllm_args(engine_args(pool, role), engine_role(pool, role))
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}},
        *source.volumes,
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
        *source.mounts,
    ]
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container: dict[str, Any] = {
        "name": "vllm",
        "image": spec.engine.image,
        "command": ["python3", "-m", vllm_args.VLLM_MODULE],
        "args": args,
        "ports": [
            {"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"},
            {"name": "nixl", "containerPort": NIXL_PORT, "protocol": "TCP"},
        ],
        "env": worker_env(pool, source),
        "resources": _resources(role_spec.resources),
        "volumeMounts": mounts,
        # Model loading can take many minutes: the startup probe allows 30.
        "startupProbe": {**health, "periodSeconds": 5, "failureThreshold": 360},
        # A CPU engine busy with a long step can take seconds to answer /health: a 1 s
        # timeout took the only decode worker (and so the router) out of its Service.
        "readinessProbe": {
            **health,
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            **health,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "lifecycle": {"preStop": {"exec": {"command": ["python3", "-c", DRAIN_SCRIPT]}}},
        "securityContext": _CONTAINER_SECURITY,
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": DRAIN_GRACE_SECONDS,
        "securityContext": _POD_SECURITY,
        "containers": [container],
        "volumes": volumes,
    }
    if source.builds_tiny_model:
        pod_spec["initContainers"] = [_tiny_model_init(spec.engine.image)]
    if role_spec.node_selector:
        pod_spec["nodeSelector"] = dict(role_spec.node_selector)
    if role_spec.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in role_spec.tolerations
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(pool, name_of(pool, role), role),
        "spec": {
            "replicas": role_spec.replicas.min,
            "selector": {"matchLabels": selector(pool, role)},
            # A new worker must load the model before an old one goes away.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels(pool, role)}, "spec": pod_spec},
        },
    }  # fmt: skip


def router_config(pool: api.InferencePool) -> dict[str, Any]:
    """What the router reads from its ConfigMap (see tandem.router.settings)."""
    spec = pool.spec
    return {
        # The router's metrics carry it as their `pool` label, which the autoscaler
        # matches (the served model name may be shared by several pools).
        "poolName": pool.name,
        "servedModelName": spec.model.effective_served_name,
        "mode": spec.mode,
        "policy": spec.router.policy,
        "autoThresholdTokens": spec.router.auto_threshold_tokens,
        "maxQueuedRequests": spec.router.max_queued_requests,
        "migrationLimit": spec.router.migration_limit,
        "slo": spec.slo.router_config(),
        "discovery": {
            "kind": "kubernetes",
            "namespace": pool.namespace,
            "port": WORKER_PORT,
            "prefillService": name_of(pool, "prefill") if spec.mode != "aggregated" else None,
            "decodeService": name_of(pool, "decode"),
        },
    }


def _router_config_text(pool: api.InferencePool) -> str:
    return json.dumps(router_config(pool), indent=2, sort_keys=True) + "\n"


def router_objects(pool: api.InferencePool, settings: PlanSettings) -> list[K8sObject]:
    spec = pool.spec.router
    name = name_of(pool, "router")
    config_text = _router_config_text(pool)
    config_hash = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    resources = _resources(spec.resources) or {
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    container = {
        "name": "router",
        "image": spec.image or settings.router_image,
        "command": ["tandem", "router", "--config", f"{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_KEY}",
                    "--port", str(ROUTER_PORT)],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "resources": resources,
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10,
                          "timeoutSeconds": 5},
        "volumeMounts": [{"name": "config", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _CONTAINER_SECURITY,
    }  # fmt: skip
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _metadata(pool, name, "router"),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(pool, name, "router"),
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(pool, name, "router"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": pool.namespace}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(pool, name, "router"),
            "data": {ROUTER_CONFIG_KEY: config_text},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(pool, name, "router"),
            "spec": {
                "replicas": spec.replicas,
                "selector": {"matchLabels": selector(pool, "router")},
                "template": {
                    "metadata": {
                        "labels": labels(pool, "router"),
                        # Rolls the routers when (and only when) their config changes.
                        "annotations": {ANNOTATION_CONFIG_HASH: config_hash},
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "enableServiceLinks": False,
                        "securityContext": _POD_SECURITY,
                        "containers": [container],
                        "volumes": [
                            {"name": "config", "configMap": {"name": name}},
                            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _metadata(pool, pool.name, "router"),
            "spec": {
                "type": "ClusterIP",
                "selector": selector(pool, "router"),
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        },
        _pdb(pool, "router"),
    ]


def worker_service(pool: api.InferencePool, role: WorkerRole) -> K8sObject:
    """Headless: the router discovers ready workers through its EndpointSlices."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, name_of(pool, role), role),
        "spec": {
            "clusterIP": "None",
            "selector": selector(pool, role),
            "ports": [
                {"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def _pdb(pool: api.InferencePool, component: str) -> K8sObject:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(pool, name_of(pool, component), component),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(pool, component)}},
    }


def plan(pool: api.InferencePool, settings: PlanSettings | None = None) -> list[K8sObject]:
    """Every child object of the pool, in a safe apply order."""
    settings = settings or PlanSettings()
    objects = router_objects(pool, settings)
    for role in pool.roles():
        objects += [worker_deployment(pool, role), worker_service(pool, role), _pdb(pool, role)]
    order = ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service",
             "PodDisruptionBudget", "Deployment"]  # fmt: skip
    return sorted(objects, key=lambda o: order.index(o["kind"]))

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
        model=spec.model.effective_path,
        served_name=spec.model.effective_served_name,
        port=WORKER_PORT,
        max_model_len=spec.model.max_model_len,
        dtype=spec.model.dtype,
        tensor_parallel_size=role_spec.tensor_parallel_size,
        max_num_seqs=role_spec.batching.max_num_seqs,
        max_num_batched_tokens=role_spec.batching.max_num_batched_tokens,
        kv_connector=spec.engine.kv_connector,
        kv_buffer_device=spec.engine.kv_buffer_device,
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
    "capabilities": {"drop": ["ALL"]},
}
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def worker_deployment(pool: api.InferencePool, role: WorkerRole) -> K8sObject:
    spec = pool.spec
    role_spec = spec.prefill if role == "prefill" else spec.decode
    args = vllm_args.build_vllm_args(engine_args(pool, role), engine_role(pool, role))
    env: list[dict[str, Any]] = [
        {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST",
         "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(NIXL_PORT)},
        {"name": "HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": "/cache/vllm"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
    ]  # fmt: skip
    env += [{"name": e.name, "value": e.value} for e in spec.engine.env]
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": "/cache"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    if spec.model.pvc:
        volumes.append(
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": spec.model.pvc, "readOnly": True},
            }
        )
        mounts.append({"name": "model", "mountPath": "/models", "readOnly": True})
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
        "env": env,
        "resources": _resources(role_spec.resources),
        "volumeMounts": mounts,
        # Model loading can take many minutes: the startup probe allows 30.
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 3},
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
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "volumeMounts": [{"name": "config", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True}],
        "securityContext": {**_CONTAINER_SECURITY, "readOnlyRootFilesystem": True},
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
                        "volumes": [{"name": "config", "configMap": {"name": name}}],
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

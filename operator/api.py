"""The InferencePool API (group ``tandem.dev``, version ``v1alpha1``).

These pydantic models are the single source of truth: ``crds/`` is generated
from them (:mod:`tandem.operator.crd`), ``tandem validate`` validates with them,
and the planner reads them. Every field has a description; it becomes
``kubectl explain`` text and the README's reference.

Cross-field rules are declared once, as :class:`Rule` objects holding both the
CEL expression the API server evaluates and the Python predicate ``tandem
validate`` evaluates, side by side, so the two verdicts cannot drift apart
without a test noticing (the ``k8s`` tier applies the same invalid manifests to
a real API server).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from tandem.roles import Mode, Role

GROUP = "tandem.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferencePool"
PLURAL = "inferencepools"
SINGULAR = "inferencepool"
# The Gateway API inference extension also has a kind InferencePool; a distinct
# short name keeps `kubectl get` unambiguous when both CRDs are installed.
SHORT_NAMES = ("tpool",)
CATEGORIES = ("tandem",)

MAX_NAME_LENGTH = 48
"""Leaves room for the longest child suffix (``-prefill``) within a DNS label."""

AutoscalingPolicy = Literal["slo", "queue", "external", "off"]
RoutingPolicy = Literal["round-robin", "least-load", "prefix-aware"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
KvConnector = Literal["NixlConnector"]
KvBufferDevice = Literal["cuda", "cpu"]
ModelSourceKind = Literal["huggingFace", "pvc", "hostPath", "image", "tiny"]
TINY_MODEL_PREFIX = "tandem/tiny"
"""A model name starting with this selects Tandem's tiny random-weight test model."""
ConditionType = Literal[
    "Ready", "Progressing", "Degraded", "ScalingLimited", "MetricsAvailable", "SLOAttained"
]
ConditionStatus = Literal["True", "False", "Unknown"]

# ---------------------------------------------------------------------------
# Durations: Go/Kubernetes style ("500ms", "1m30s"), which CEL's duration() parses.

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration string such as ``500ms`` or ``1m30s``."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration such as 500ms, 2s or 1m30s")
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration` for display (``0.42`` → ``420ms``)."""
    if seconds < 1.0:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60.0:
        return f"{seconds:.3g}s"
    return f"{seconds / 60.0:.3g}m"


def _positive_duration(text: str) -> str:
    if parse_duration(text) <= 0:
        raise ValueError(f"{text!r} must be a positive duration such as 500ms")
    return text


Duration = Annotated[
    str,
    Field(max_length=32),
    AfterValidator(_positive_duration),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "x-kubernetes-validations": [
                {
                    "rule": "duration(self) > duration('0s')",
                    "message": "must be a positive duration such as 500ms",
                }
            ],
        }
    ),
]

QUANTITY_PATTERN = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


def _quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 2, 500m or 16Gi")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

# ---------------------------------------------------------------------------
# Cross-field rules


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, in CEL for the API server and in Python for us."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    """Receives the model instance; True means valid."""

    def schema(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message}


class _Model(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=False,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self


def _desc(text: str, **kwargs: Any) -> Any:
    return Field(description=text, **kwargs)


# ---------------------------------------------------------------------------
# Spec


class SecretKeyRef(_Model):
    """One key of a Secret in the pool's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(default="token", min_length=1, max_length=253, description="Key in it.")


class HuggingFaceSpec(_Model):
    """How workers download weights from the Hugging Face Hub."""

    token_secret: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding a Hugging Face access token (gated or private "
        "models); the workers get it as HF_TOKEN.",
    )
    cache_claim: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="A PersistentVolumeClaim for the download cache (HF_HOME), so a new pod "
        "finds the weights already there (ReadWriteMany when workers span nodes). Default: "
        "an emptyDir, so every new pod downloads the model again.",
    )


class ModelSpec(_Model):
    """Which model the workers serve, and where its weights come from: one source of
    the Hugging Face Hub (the default: vLLM downloads `name`), a PersistentVolumeClaim
    (`pvc`), a node directory (`hostPath`), a path inside the engine image (`path`
    alone), or Tandem's tiny test model (a `name` starting with `tandem/tiny`)."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.pvc) && has(self.hostPath))",
            message="model.pvc and model.hostPath are exclusive: the weights come from one volume",
            check=lambda m: not (m.pvc and m.host_path),
        ),
        Rule(
            cel="!has(self.huggingFace) || !(has(self.pvc) || has(self.hostPath) || "
            f"has(self.path) || self.name.startsWith('{TINY_MODEL_PREFIX}'))",
            message="model.huggingFace applies only to weights downloaded from the hub: "
            "not with pvc, hostPath, path or a tandem/tiny model",
            check=lambda m: m.hugging_face is None or m.source_kind == "huggingFace",
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=256,
        description="Model id, e.g. meta-llama/Llama-3.1-8B-Instruct: what vLLM downloads from "
        "the Hugging Face Hub unless `pvc`, `hostPath` or `path` say where the weights are, "
        "and the served name unless `servedName` is set. A name starting with `tandem/tiny` "
        "(e.g. tandem/tiny-llama) selects Tandem's tiny random-weight test model: nothing is "
        "downloaded; on a cluster a `tiny-model` init container of the engine image builds it "
        "into an emptyDir at /models/tiny (the image must hold the tandem package, as "
        "ghcr.io/tandem-dev/tandem-vllm-cpu does), and `tandem up` builds it locally.",
    )
    served_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="The name clients put in the `model` field of their requests. "
        "Defaults to `name`.",
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Where the weights are inside the worker container: a directory baked "
        "into the engine image, or one inside the `pvc` or `hostPath` volume (mounted at "
        "/models). When set, vLLM loads from here instead of resolving `name`.",
    )
    pvc: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Name of a PersistentVolumeClaim holding the weights, mounted read-only "
        "at /models in every worker. `path` defaults to /models when this is set.",
    )
    host_path: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        pattern="^/",
        description="A directory holding the weights on every node that runs a worker, "
        "mounted read-only at /models (`path` defaults to /models). For single-node and test "
        "clusters; elsewhere prefer `pvc`.",
    )
    hugging_face: HuggingFaceSpec | None = Field(
        default=None,
        description="Download options (token, cache volume) for weights from the Hugging Face "
        "Hub, the source when no other is given.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description="Longest prompt plus completion, in tokens (vLLM --max-model-len). "
        "Defaults to the model's own limit.",
    )
    dtype: Dtype = Field(default="auto", description="Weight and activation dtype (vLLM --dtype).")

    @property
    def effective_served_name(self) -> str:
        return self.served_name or self.name

    @property
    def effective_path(self) -> str:
        if self.path:
            return self.path
        return "/models" if self.pvc or self.host_path else self.name

    @property
    def source_kind(self) -> ModelSourceKind:
        """Where the weights come from (the first that applies)."""
        if self.pvc:
            return "pvc"
        if self.host_path:
            return "hostPath"
        if self.path:
            return "image"
        if self.name.startswith(TINY_MODEL_PREFIX):
            return "tiny"
        return "huggingFace"


class EnvVar(_Model):
    """An environment variable for the engine container."""

    name: str = Field(min_length=1, max_length=256, description="Variable name.")
    value: str = Field(default="", description="Variable value.")


class EngineSpec(_Model):
    """The inference engine the workers run."""

    image: str = Field(
        default="vllm/vllm-openai:v0.32.0",
        min_length=1,
        description="Container image of the vLLM OpenAI server (run as `python3 -m "
        "vllm.entrypoints.openai.api_server`, non-root, on a read-only root filesystem). "
        "CPU pools need a CPU build of vLLM with NIXL, such as "
        "ghcr.io/tandem-dev/tandem-vllm-cpu (not published: build it with "
        "scripts/build-images.sh vllm-cpu), which examples/tiny.yaml names.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Extra vLLM command-line arguments for every worker, appended last.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment variables for every worker.",
    )
    kv_connector: KvConnector = Field(
        default="NixlConnector",
        description="The KV connector that moves the cache from prefill to decode workers.",
    )
    kv_buffer_device: KvBufferDevice = Field(
        default="cuda",
        description="Where the connector stages KV blocks: `cuda` on GPU nodes, `cpu` for "
        "CPU-only workers. `cpu` also runs vLLM with --enforce-eager and "
        "VLLM_CPU_KVCACHE_SPACE=1 (GiB of KV cache; set it in `env` to change it).",
    )


class ReplicaRange(_Model):
    """How many workers a role may have; the autoscaler moves between the bounds."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.min <= self.max",
            message="replicas.min must be less than or equal to replicas.max",
            check=lambda r: r.min <= r.max,
        ),
    )

    min: int = Field(default=1, ge=0, description="Fewest workers. 0 is allowed for prefill.")
    max: int = Field(default=1, ge=1, description="Most workers.")


class ResourceRequirements(_Model):
    """Compute resources of one worker pod (as in a Pod's container)."""

    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Resource limits, e.g. {nvidia.com/gpu: 1, memory: 64Gi}.",
    )
    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Resource requests, e.g. {cpu: 8, memory: 64Gi}.",
    )


class Toleration(_Model):
    """A pod toleration (as in a Pod spec)."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated."
    )


class BatchingSpec(_Model):
    """Per-role batching limits of the engine."""

    max_num_seqs: int | None = Field(
        default=None, ge=1, description="Most sequences in one batch (vLLM --max-num-seqs)."
    )
    max_num_batched_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens in one scheduler step (vLLM --max-num-batched-tokens); "
        "bounds prefill chunk size.",
    )


class RoleSpec(_Model):
    """One pool of workers: prefill or decode."""

    replicas: ReplicaRange = Field(default_factory=ReplicaRange, description="Replica bounds.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Resources of each worker pod."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="GPUs per worker (vLLM --tensor-parallel-size)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the worker pods must run on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations of the worker pods."
    )
    batching: BatchingSpec = Field(
        default_factory=BatchingSpec, description="Batching limits of this role's engine."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of GPU memory vLLM may use (vLLM --gpu-memory-utilization).",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Extra vLLM arguments for this role only, after engine.extraArgs.",
    )


class SloSpec(_Model):
    """Latency objectives; the autoscaler sizes each pool to meet them."""

    ttft: Duration = Field(
        default="1s", description="Time to first token objective, e.g. 500ms. Prefill follows it."
    )
    tpot: Duration = Field(
        default="100ms",
        description="Time per output token objective, e.g. 50ms. Decode follows it.",
    )
    percentile: float = Field(
        default=90,
        gt=0,
        lt=100,
        description="Which percentile of requests must meet the objectives, e.g. 90 or 99.",
    )
    attainment_window: Duration = Field(
        default="5m",
        description="The router reports the share of the requests finished this long "
        "back that met the objectives (status.slo, the SLOAttained condition).",
    )

    def router_config(self) -> dict[str, float]:
        """The router's ``slo`` settings (seconds; ``tandem.router.settings.SloSettings``)."""
        return {
            "ttft": parse_duration(self.ttft),
            "tpot": parse_duration(self.tpot),
            "percentile": self.percentile,
            "window": parse_duration(self.attainment_window),
        }


class DecodeStepProfile(_Model):
    """A decode worker's step time against its KV-cache usage, as a profiling run
    measures it: ``base + perKvUsage * usage`` (usage from 0 to 1)."""

    base: Duration = Field(description="Step time of a nearly empty cache, e.g. 8ms.")
    per_kv_usage: Duration = Field(
        description="Step time added by a full cache (usage 1.0) over `base`, e.g. 28ms."
    )


class AutoscalingSpec(_Model):
    """How Tandem sizes the prefill and decode pools."""

    policy: AutoscalingPolicy = Field(
        default="slo",
        description="`slo`: follow TTFT/TPOT and queues; `queue`: follow queue depth only; "
        "`external`: Tandem never writes replicas (HPA/KEDA may own them); `off`: hold "
        "replicas.min.",
    )
    interval: Duration = Field(default="15s", description="How often decisions are made.")
    window: Duration = Field(
        default="1m", description="Window over which latency percentiles are measured."
    )
    scale_up_stabilization: Duration = Field(
        default="30s",
        description="A scale-up needs the pressure to last this long; also the cooldown "
        "after a scale-up before the next.",
    )
    scale_down_stabilization: Duration = Field(
        default="5m", description="A scale-down needs the pool to be idle enough this long."
    )
    max_scale_up_step: int = Field(default=2, ge=1, description="Most replicas added at once.")
    max_scale_down_step: int = Field(default=1, ge=1, description="Most replicas removed at once.")
    target_queue_per_replica: float = Field(
        default=4, gt=0, description="Waiting requests per worker the pools are sized for."
    )
    warmup: Duration = Field(
        default="2m", description="Samples from pods younger than this are ignored."
    )
    gpu_budget: int | None = Field(
        default=None,
        ge=1,
        description="Most GPUs both pools together may use; shared by pressure when short.",
    )
    forecast: Duration | None = Field(
        default=None,
        description="Extrapolate rising load (prompt tokens/s, the decode rate) this far "
        "ahead before sizing for it: about scaleUpStabilization plus the time a worker "
        "takes to start serving. Unset: size for the load as measured.",
    )
    prefill_capacity: int | None = Field(
        default=None,
        ge=1,
        description="Prompt tokens per second one prefill worker sustains, from a "
        "profiling run. Unset: learned while serving (from the load at which TTFT breaks).",
    )
    decode_step: DecodeStepProfile | None = Field(
        default=None,
        description="The decode step time profiled against KV usage; it caps the line "
        "fitted while serving. Unset: the fitted line only.",
    )
    load_tolerance: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="How far KV usage and prompt load may exceed their targets before a "
        "scale-up (0: at once; their targets carry the SLO's margin already). Unset: "
        "0.1, as for queues.",
    )
    load_scale_down_ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="The fraction of their targets KV usage and prompt load must stay "
        "under on the smaller pool for a scale-down (1: the targets themselves). "
        "Unset: 0.8.",
    )


class RouterSpec(_Model):
    """The gateway router in front of the pools."""

    replicas: int = Field(default=2, ge=1, le=64, description="Router replicas.")
    policy: RoutingPolicy = Field(
        default="least-load", description="How a worker is picked within a pool."
    )
    auto_threshold_tokens: int = Field(
        default=256,
        ge=1,
        description="In mode auto, prompts shorter than this many tokens skip the prefill "
        "pool and are prefilled on the decode worker.",
    )
    max_queued_requests: int = Field(
        default=256,
        ge=0,
        description="Requests a router replica holds while every worker is busy; past it, "
        "429 with Retry-After.",
    )
    migration_limit: int = Field(
        default=3,
        ge=0,
        le=16,
        description="When a decode worker fails after the client has received tokens, the "
        "router continues the same stream on another decode worker from the prompt and the "
        "tokens already sent (one stream, one id, usage counted once), at most this many "
        "times per request; 0 turns it off (the stream then ends with an error event).",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="Router container image. Defaults to the operator's own image.",
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements, description="Resources of each router pod."
    )


def _gpus(role: RoleSpec) -> int:
    return role.replicas.min * role.tensor_parallel_size


class InferencePoolSpec(_Model):
    """A model served by separate prefill and decode pools behind one router."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.decode.replicas.min >= 1",
            message="decode.replicas.min must be at least 1: decode workers serve every request",
            check=lambda s: s.decode.replicas.min >= 1,
        ),
        Rule(
            cel="!has(self.autoscaling.gpuBudget) || self.autoscaling.gpuBudget >= "
            "self.prefill.replicas.min * self.prefill.tensorParallelSize + "
            "self.decode.replicas.min * self.decode.tensorParallelSize",
            message="autoscaling.gpuBudget is smaller than the GPUs the minimum replicas "
            "need (replicas.min * tensorParallelSize, both roles)",
            check=lambda s: (
                s.autoscaling.gpu_budget is None
                or s.autoscaling.gpu_budget >= _gpus(s.prefill) + _gpus(s.decode)
            ),
        ),
    )

    model: ModelSpec = Field(description="The model to serve.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="The engine.")
    mode: Mode = Field(
        default="disaggregated",
        description="`disaggregated`: every request is prefilled on the prefill pool and "
        "decoded on the decode pool; `aggregated`: decode workers serve whole requests and "
        "no prefill pool runs; `auto`: the router skips the prefill hop for short prompts.",
    )
    prefill: RoleSpec = Field(default_factory=RoleSpec, description="The prefill pool.")
    decode: RoleSpec = Field(default_factory=RoleSpec, description="The decode pool.")
    slo: SloSpec = Field(default_factory=SloSpec, description="Latency objectives.")
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Scaling of both pools."
    )
    router: RouterSpec = Field(default_factory=RouterSpec, description="The gateway router.")


# ---------------------------------------------------------------------------
# Status (written by the operator and the autoscaler, never by users)


class Condition(_Model):
    """A Kubernetes-style condition."""

    type: ConditionType = Field(description="Ready, Progressing, Degraded, ...")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(
        default=None, description="When status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, description="The spec generation this condition speaks of."
    )


class ScalingDecision(_Model):
    """The autoscaler's last decision for a role."""

    time: str = Field(description="When it was made (RFC 3339).")
    from_replicas: int = Field(description="Replicas before.")
    to_replicas: int = Field(description="Replicas decided.")
    reason: str = Field(description='Why, e.g. "TTFT p90 820ms > 500ms".')


class RoleStatus(_Model):
    """Observed state of one pool."""

    replicas: int = Field(default=0, description="Worker pods that exist.")
    ready_replicas: int = Field(default=0, description="Worker pods ready to serve.")
    desired_replicas: int = Field(default=0, description="Replicas the autoscaler wants.")
    summary: str = Field(default="", description='"ready/desired", for printer columns.')
    last_decision: ScalingDecision | None = Field(
        default=None, description="The last scaling decision."
    )


class ObservedLatency(_Model):
    """Latency and queue as measured over the autoscaling window."""

    ttft: str | None = Field(default=None, description="Observed TTFT at the SLO percentile.")
    tpot: str | None = Field(default=None, description="Observed TPOT at the SLO percentile.")
    ttft_seconds: float | None = Field(default=None, description="The same, in seconds.")
    tpot_seconds: float | None = Field(default=None, description="The same, in seconds.")
    queue_depth: float | None = Field(default=None, description="Requests waiting, all workers.")


class SloAttainment(_Model):
    """Shares (0 to 1) of the window's requests that met the objectives."""

    ttft: float | None = Field(default=None, description="Met the TTFT objective.")
    tpot: float | None = Field(default=None, description="Met the TPOT objective.")
    both: float | None = Field(default=None, description="Met both objectives.")


class SloStatus(_Model):
    """How many recent requests met the objectives, as the pool's routers counted them."""

    attainment: SloAttainment | None = Field(
        default=None, description="Shares that met the objectives; absent with no traffic."
    )
    requests: int | None = Field(
        default=None, description="Requests that finished within the window (streamed)."
    )
    window: str | None = Field(default=None, description="The window, e.g. 5m.")
    summary: str | None = Field(
        default=None,
        description='Share that met both objectives, e.g. "93.1%", for printer columns.',
    )


class InferencePoolStatus(_Model):
    """What the operator and the autoscaler observed and did."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(
        default=None, description="The spec generation last reconciled."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Conditions.",
        # A map keyed by type: the operator and the autoscaler each server-side apply
        # their own conditions without taking the other's.
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    prefill: RoleStatus = Field(default_factory=RoleStatus, description="The prefill pool.")
    decode: RoleStatus = Field(default_factory=RoleStatus, description="The decode pool.")
    observed: ObservedLatency = Field(
        default_factory=ObservedLatency, description="Measured latencies."
    )
    slo: SloStatus = Field(
        default_factory=SloStatus, description="SLO attainment over spec.slo.attainmentWindow."
    )
    endpoint: str | None = Field(
        default=None, description="In-cluster URL of the OpenAI-compatible endpoint."
    )


class ObjectMeta(BaseModel):
    """The parts of metadata Tandem reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="Pool name: a DNS label of at most 48 characters.",
    )
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class InferencePool(BaseModel):
    """An InferencePool object as stored by the API server."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    api_version: Literal["tandem.dev/v1alpha1"] = "tandem.dev/v1alpha1"
    kind: Literal["InferencePool"] = "InferencePool"
    metadata: ObjectMeta
    spec: InferencePoolSpec
    status: InferencePoolStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    def roles(self) -> tuple[Role, ...]:
        """The worker roles this pool runs: aggregated mode has no prefill pool."""
        return ("decode",) if self.spec.mode == "aggregated" else ("prefill", "decode")

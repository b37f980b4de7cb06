"""What the router reads at start: ``RouterSettings``.

The operator writes :func:`tandem.operator.planning.router_config` into the
router's ConfigMap; that JSON (camelCase) loads here unchanged, and every other
field has a default. Local mode builds the same model with
``discovery: {kind: static, prefill: [...], decode: [...]}``
(:func:`static_settings`).

Durations are plain seconds (floats): the file is written by a program, not a person.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from tandem.roles import Mode

RoutingPolicy = Literal["round-robin", "least-load", "prefix-aware"]


class _Settings(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class KubernetesDiscovery(_Settings):
    """Workers are the ready endpoints of two Services, read from EndpointSlices."""

    kind: Literal["kubernetes"] = "kubernetes"
    namespace: str = Field(min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    """Worker port, used when a slice names no port called ``http``."""
    prefill_service: str | None = None
    """None in aggregated mode: no prefill pool."""
    decode_service: str = Field(min_length=1)
    kubeconfig: str | None = None
    """Path of a kubeconfig; None means in-cluster (service-account token and CA)."""


class StaticDiscovery(_Settings):
    """A fixed list of worker base URLs (local mode, tests, benchmarks)."""

    kind: Literal["static"] = "static"
    prefill: list[str] = Field(default_factory=list)
    decode: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _urls(self) -> StaticDiscovery:
        for url in (*self.prefill, *self.decode):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not a base URL such as http://127.0.0.1:8000")
        return self


Discovery = Annotated[KubernetesDiscovery | StaticDiscovery, Field(discriminator="kind")]


class LimitSettings(_Settings):
    """Requests past these limits are refused with a 4xx before reaching a worker."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body (413 past it)."""
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Longest prompt, in tokens (estimated when no tokenizer is configured). None: the
    workers' own ``--max-model-len`` is the limit."""
    max_max_tokens: int | None = Field(default=None, ge=1)
    """Largest ``max_tokens`` / ``max_completion_tokens`` a client may ask for."""


class TimeoutSettings(_Settings):
    """Seconds. Every wait of the router is bounded: nothing hangs."""

    connect: float = Field(default=3.0, gt=0)
    """Opening a TCP connection to a worker."""
    prefill: float = Field(default=120.0, gt=0)
    """The whole prefill hop (queue on the prefill worker + the prompt's forward pass)."""
    first_byte: float = Field(default=120.0, gt=0)
    """From sending a request to a decode worker to its first body byte (queue + KV pull)."""
    idle: float = Field(default=60.0, gt=0)
    """Longest silence between two chunks of a response once it started."""
    request: float = Field(default=600.0, gt=0)
    """A non-streamed decode hop, whole (its first byte is its last)."""
    queue: float = Field(default=30.0, gt=0)
    """Longest wait in the router's own queue before 503."""


class RetrySettings(_Settings):
    """Attempts on *other* workers after the first one failed."""

    prefill: int = Field(default=1, ge=0, le=8)
    """Prefill retries; when they are spent, the decode worker prefills locally."""
    decode: int = Field(default=1, ge=0, le=8)
    """Decode retries, only before the client got its first byte."""


class AuthSettings(_Settings):
    """Optional API keys (``Authorization: Bearer <key>``); none configured: no auth."""

    api_key_file: str | None = None
    """A file with one key per line (blank lines and ``#`` comments ignored)."""
    api_key_env: str | None = None
    """An environment variable holding one key, or several separated by commas."""

    def load_keys(self) -> frozenset[str]:
        keys: set[str] = set()
        if self.api_key_file:
            for line in Path(self.api_key_file).read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
        if self.api_key_env:
            keys.update(k.strip() for k in os.environ.get(self.api_key_env, "").split(","))
        keys.discard("")
        return frozenset(keys)


class ScrapeSettings(_Settings):
    """Reading each worker's ``/metrics`` for queue depth and KV-cache usage."""

    enabled: bool = True
    interval: float = Field(default=1.0, gt=0)
    timeout: float = Field(default=1.0, gt=0)


class PrefixSettings(_Settings):
    """The prefix-aware policy's key and load bound."""

    block_chars: int = Field(default=64, ge=1)
    """Characters per prefix block (about 16 tokens, vLLM's KV block)."""
    blocks: int = Field(default=8, ge=1)
    """How many leading blocks make the key: prompts sharing them share a worker."""
    load_factor: float = Field(default=1.25, ge=1.0)
    """A worker takes a prefix only while its load is under ``load_factor`` times the
    mean (consistent hashing with bounded loads), so a hot prefix spreads."""


class SloSettings(_Settings):
    """The latency objectives whose attainment the router reports (``router/METRICS.md``:
    ``tandem_router_slo_*``); absent, the router reports none."""

    ttft: float | None = Field(default=None, gt=0)
    """Time to first token objective, seconds; None: not an objective."""
    tpot: float | None = Field(default=None, gt=0)
    """Time per output token objective, seconds; None: not an objective."""
    percentile: float = Field(default=90.0, gt=0, lt=100)
    """The share of requests (in percent) that should meet them: the target the
    attainment is compared with (``tandem_router_slo_target``)."""
    window: float = Field(default=300.0, gt=0)
    """Seconds of recent requests the attainment is measured over."""

    @model_validator(mode="after")
    def _some_objective(self) -> SloSettings:
        if self.ttft is None and self.tpot is None:
            raise ValueError("slo needs a ttft or a tpot objective")
        return self


class RouterSettings(_Settings):
    """Everything the router needs; loads ``planning.router_config(pool)`` as is."""

    served_model_name: str = Field(min_length=1)
    """The only model this router serves (the ``model`` field clients send)."""
    pool_name: str | None = None
    """The ``pool`` label on metrics; defaults to ``served_model_name``."""
    mode: Mode = "disaggregated"
    policy: RoutingPolicy = "least-load"
    auto_threshold_tokens: int = Field(default=256, ge=1)
    """Mode auto: prompts shorter than this are prefilled on the decode worker."""
    max_queued_requests: int = Field(default=256, ge=0)
    """Requests held while every decode worker is at ``maxInFlightPerEndpoint``;
    past it, 429 with Retry-After."""
    max_in_flight_per_endpoint: int = Field(default=256, ge=1)
    """A decode worker counts as busy past this many of this router's requests
    (vLLM's default ``--max-num-seqs`` is 256)."""
    retry_after_seconds: int = Field(default=1, ge=0)
    discovery: Discovery
    limits: LimitSettings = Field(default_factory=LimitSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    scrape: ScrapeSettings = Field(default_factory=ScrapeSettings)
    prefix: PrefixSettings = Field(default_factory=PrefixSettings)
    tokenizer: str | None = None
    """A ``tokenizer.json`` (or a directory holding one) for exact prompt lengths;
    without it (or without the ``tokenizers`` package) lengths are estimated."""
    migration_limit: int = Field(default=3, ge=0, le=16)
    """How many times one streamed request may move to another decode worker when
    its worker fails after the client got tokens (the stream goes on from what was
    sent, see ``migration``); 0 turns migration off (the stream ends with an error
    event)."""
    endpoint_cooldown: float = Field(default=5.0, ge=0)
    """Seconds a worker is avoided after a connection to it failed."""
    max_connections: int = Field(default=1024, ge=1)
    """Pooled HTTP connections to the workers, all of them together."""
    slo: SloSettings | None = None
    """The objectives to report attainment of (the pool's ``spec.slo``); None: none."""

    @property
    def pool_label(self) -> str:
        return self.pool_name or self.served_model_name


def load(path: str | Path) -> RouterSettings:
    """Settings from a JSON file (the ConfigMap key ``router.json``)."""
    text = Path(path).read_text(encoding="utf-8")
    return RouterSettings.model_validate(json.loads(text))


def static_settings(
    served_model_name: str,
    *,
    prefill: Sequence[str] = (),
    decode: Sequence[str],
    mode: Mode = "disaggregated",
    policy: RoutingPolicy = "least-load",
    **extra: object,
) -> RouterSettings:
    """Settings for fixed worker URLs (what local mode and the tests use)."""
    return RouterSettings.model_validate(
        {
            "servedModelName": served_model_name,
            "mode": mode,
            "policy": policy,
            "discovery": {"kind": "static", "prefill": list(prefill), "decode": list(decode)},
            **extra,
        }
    )

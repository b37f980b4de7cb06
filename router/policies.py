"""Which worker gets a request: pure functions ``select(features, snapshot) -> Endpoint``.

No I/O, no clock, no web framework: a policy sees what the router extracted from
the request (:class:`Features`) and a frozen :class:`~tandem.router.endpoints.Snapshot`
of one role's workers, and returns one of them (None only when there is none).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from tandem.router import settings
from tandem.router.endpoints import Endpoint, Snapshot

__all__ = [
    "Features",
    "Policy",
    "least_load",
    "make",
    "prefix_aware",
    "round_robin",
    "score",
]

_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Features:
    """What a policy may know about a request."""

    prompt_tokens: int = 0
    prefix_key: int | None = None
    """A hash of the prompt's leading blocks (see ``payloads.prefix_key``); None when
    the prompt is empty."""


Policy = Callable[[Features, Snapshot], Endpoint | None]

KV_WEIGHT = 4.0
"""A full KV cache weighs as much as four queued requests: near full, vLLM preempts."""


def round_robin(features: Features, snapshot: Snapshot) -> Endpoint | None:
    """Each worker in turn."""
    endpoints = snapshot.endpoints
    if not endpoints:
        return None
    return endpoints[snapshot.turn % len(endpoints)]


def score(endpoint: Endpoint, kv_weight: float = KV_WEIGHT) -> float:
    """Least-load's cost of a worker: this router's in-flight requests, the engine's
    queue, and its KV-cache usage."""
    load = endpoint.load
    return endpoint.in_flight + load.waiting + kv_weight * load.kv_usage


def least_load(
    features: Features, snapshot: Snapshot, *, kv_weight: float = KV_WEIGHT
) -> Endpoint | None:
    """The worker with the lowest :func:`score`; ties rotate with ``snapshot.turn``."""
    endpoints = snapshot.endpoints
    if len(endpoints) <= 1:
        return endpoints[0] if endpoints else None
    scores = [score(e, kv_weight) for e in endpoints]
    best = min(scores)
    tied = [e for e, s in zip(endpoints, scores, strict=True) if s == best]
    return tied[snapshot.turn % len(tied)]


def _mix(x: int) -> int:
    """SplitMix64's finalizer: a cheap, well-spread 64-bit hash of an int."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def prefix_aware(
    features: Features,
    snapshot: Snapshot,
    *,
    load_factor: float = 1.25,
    kv_weight: float = KV_WEIGHT,
) -> Endpoint | None:
    """Prompts that share leading blocks go to the same worker (its prefix cache has
    them), by rendezvous hashing of the prefix key over the workers; a worker is
    skipped while its load is at ``ceil(load_factor * (total + 1) / n)`` (consistent
    hashing with bounded loads), so one hot prefix spills over to the next worker in
    its rendezvous order instead of piling onto one. No key: least-load.
    """
    endpoints = snapshot.endpoints
    key = features.prefix_key
    if key is None or len(endpoints) <= 1:
        return least_load(features, snapshot, kv_weight=kv_weight)
    loads = [e.in_flight + e.load.waiting for e in endpoints]
    bound = math.ceil(load_factor * (sum(loads) + 1) / len(endpoints))
    ranked = sorted(range(len(endpoints)), key=lambda i: _mix(key ^ endpoints[i].key), reverse=True)
    for i in ranked:
        if loads[i] < bound:
            return endpoints[i]
    return least_load(features, snapshot, kv_weight=kv_weight)


def make(name: settings.RoutingPolicy, prefix: settings.PrefixSettings) -> Policy:
    """The policy a settings name stands for, with its parameters bound."""
    if name == "round-robin":
        return round_robin
    if name == "least-load":
        return least_load
    return functools.partial(prefix_aware, load_factor=prefix.load_factor)

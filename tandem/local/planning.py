"""Local mode's plan: which workers a pool runs on this machine, on which ports and cores,
and where their weights come from. Pure, except :func:`resolve_model` (which may build
the tiny model)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tandem import roles
from tandem.operator import api

Engine = Literal["vllm", "emulator"]

TINY_MODEL_PREFIX = api.TINY_MODEL_PREFIX
"""A model name with this prefix is built here (the API's rule: one spelling)."""


class LocalModeError(Exception):
    """Local mode cannot run this pool as asked; the message says what to change."""


@dataclass(frozen=True)
class WorkerPlan:
    """One worker to start: its role, name, port and (for vLLM) cores."""

    role: roles.Role
    name: str
    port: int
    cpus: str | None


def cpu_sets(count: int, cores: int) -> list[str | None]:
    """Cores per worker: spread ``count`` workers over ``cores`` round-robin.

    vLLM on the CPU spins its OpenMP threads; two workers on one core halve each
    other, so with as many cores as workers each gets its own.
    """
    if cores <= 0:
        return [None] * count
    return [str(i % cores) for i in range(count)]


def plan_workers(
    pool: api.InferencePool,
    ports: Sequence[int],
    cores: int,
    replicas: dict[roles.Role, int] | None = None,
) -> list[WorkerPlan]:
    """The workers of a pool: ``replicas.min`` per role unless ``replicas`` says."""
    counts = {
        role: (replicas or {}).get(role, role_spec(pool, role).replicas.min)
        for role in pool.roles()
    }
    total = sum(counts.values())
    if len(ports) < total:
        raise ValueError(f"need {total} ports, got {len(ports)}")
    cpus = cpu_sets(total, cores)
    out: list[WorkerPlan] = []
    for role, count in counts.items():
        for index in range(count):
            slot = len(out)
            out.append(WorkerPlan(role, f"{role}-{index}", ports[slot], cpus[slot]))
    return out


def role_spec(pool: api.InferencePool, role: roles.Role) -> api.RoleSpec:
    return pool.spec.prefill if role == "prefill" else pool.spec.decode


@dataclass(frozen=True)
class LocalSettings:
    """How ``tandem up`` runs a pool."""

    engine: Engine = "vllm"
    host: str = "127.0.0.1"
    port: int = 8000
    run_dir: Path = Path(".tandem/run")
    """Worker logs, caches and temp files; the tiny model is cached beside it."""
    cores: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    startup_timeout_s: float = 600.0


def resolve_model(pool: api.InferencePool, settings: LocalSettings) -> str:
    """A local directory with the weights: the pool's own, or the tiny model built here."""
    model = pool.spec.model
    for candidate in (model.path, model.name):
        if candidate and Path(candidate).is_dir():
            return str(Path(candidate).absolute())
    if model.name.startswith(TINY_MODEL_PREFIX):
        from tandem.workers import tinymodel

        return str(tinymodel.cached_tiny_model(settings.run_dir.parent / "models").absolute())
    raise LocalModeError(
        f"spec.model: {model.path or model.name!r} is not a local directory and local mode never "
        "downloads weights: point spec.model.path at a local copy, name a model "
        f"'{TINY_MODEL_PREFIX}-…' to have one built, or use --engine emulator"
    )

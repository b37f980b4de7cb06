"""Where a starting worker is, read from its own log: pure.

A vLLM server spends its start in a few long phases; its log says when each one
ends (the messages of vLLM 0.32's API server, engine core and CPU model runner).
:func:`phase_of` maps the log so far to the latest phase reached, so ``tandem up``
can say what a worker is doing instead of printing nothing for a minute or two.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["MARKERS", "Phase", "phase_of"]


class Phase(enum.Enum):
    """The phases of a worker's start, in order."""

    IMPORTING = "importing"
    """The API server process imports vLLM, torch and their kin."""
    STARTING_ENGINE = "starting the engine"
    """The engine-core process starts (vLLM on the CPU spawns it: it imports again)."""
    STARTING_WORKER = "starting the worker"
    """The model-worker process starts (spawned too: a third import)."""
    LOADING_MODEL = "loading the model"
    ALLOCATING_KV = "allocating KV cache"
    WARMING_UP = "warming up"
    STARTING_SERVER = "starting the server"
    READY = "ready"
    """``/health`` answered (the launcher knows; no log line says it)."""


MARKERS: tuple[tuple[str, Phase], ...] = (
    ("non-default args:", Phase.STARTING_ENGINE),
    ("vLLM server version", Phase.STARTING_ENGINE),
    ("Initializing a V1 LLM engine", Phase.STARTING_WORKER),
    ("Starting to load model", Phase.LOADING_MODEL),
    ("Loading weights took", Phase.ALLOCATING_KV),
    ("Model loading took", Phase.ALLOCATING_KV),
    ("Warming up model", Phase.WARMING_UP),
    ("init engine (profile, create kv cache, warmup model) took", Phase.STARTING_SERVER),
    ("Starting vLLM server on", Phase.STARTING_SERVER),
    ("Application startup complete", Phase.STARTING_SERVER),
)
"""A log line containing the text → the phase the worker is in from then on."""

_ORDER = {phase: i for i, phase in enumerate(Phase)}


def phase_of(lines: Iterable[str], since: Phase = Phase.IMPORTING) -> Phase:
    """The latest phase ``lines`` show, never earlier than ``since`` (pass the phase
    known so far and only the lines logged since: the log is read incrementally)."""
    current = since
    for line in lines:
        for text, phase in MARKERS:
            if text in line and _ORDER[phase] > _ORDER[current]:
                current = phase
    return current

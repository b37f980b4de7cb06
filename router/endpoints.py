"""The workers the router knows, what it knows about their load, and snapshots of it.

:class:`EndpointSet` is the mutable side (one per role): discovery replaces its
URLs, the scraper records load, the orchestrator counts requests in and out.
Policies never see it: they get a :class:`Snapshot`, frozen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from tandem import roles

__all__ = ["Endpoint", "EndpointSet", "Load", "Snapshot", "url_key"]


def url_key(url: str) -> int:
    """A stable 64-bit key of a worker URL (rendezvous hashing mixes it with the prompt's)."""
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True)
class Load:
    """What a worker's ``/metrics`` said last (zeros until the first scrape)."""

    waiting: float = 0.0
    """``vllm:num_requests_waiting``: the engine's own queue."""
    running: float = 0.0
    """``vllm:num_requests_running``."""
    kv_usage: float = 0.0
    """``vllm:kv_cache_usage_perc``, 0..1."""


NO_LOAD = Load()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One worker as a policy sees it."""

    url: str
    key: int
    in_flight: int = 0
    """This router's requests on the worker right now."""
    load: Load = NO_LOAD


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The candidates for one choice, in a stable order (discovery order)."""

    role: roles.Role
    endpoints: tuple[Endpoint, ...]
    turn: int = 0
    """How many choices this role has made before: round-robin's position and the
    tie-breaker that keeps equal scores from always picking the first worker."""


@dataclass(slots=True)
class _State:
    url: str
    key: int
    in_flight: int = 0
    load: Load = NO_LOAD
    down_until: float = 0.0
    requests: int = 0
    failures: int = 0


@dataclass
class EndpointSet:
    """The workers of one role; mutated only from the event loop (no locks)."""

    role: roles.Role
    _states: dict[str, _State] = field(default_factory=dict)
    _turn: int = 0

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def replace(self, urls: Iterable[str]) -> bool:
        """Make the set exactly ``urls``, keeping what is known of the survivors.

        Returns whether anything changed. A removed worker's in-flight requests
        finish on their own; only new choices stop seeing it.
        """
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))
        if wanted == list(self._states):
            return False
        old = self._states
        self._states = {u: old.get(u) or _State(u, url_key(u)) for u in wanted}
        return True

    def snapshot(self, now: float, exclude: frozenset[str] = frozenset()) -> Snapshot:
        """Candidates: every worker not excluded and not cooling down after a failure.

        When all of them are cooling down they are all offered anyway: a guess
        beats a refusal, and the cooldown may be stale.
        """
        self._turn += 1
        states = [s for s in self._states.values() if s.url not in exclude]
        healthy = [s for s in states if s.down_until <= now]
        chosen = healthy or states
        return Snapshot(
            self.role,
            tuple(Endpoint(s.url, s.key, s.in_flight, s.load) for s in chosen),
            self._turn,
        )

    def acquire(self, url: str) -> None:
        state = self._states.get(url)
        if state is not None:
            state.in_flight += 1
            state.requests += 1

    def release(self, url: str) -> None:
        state = self._states.get(url)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def mark_down(self, url: str, until: float) -> None:
        state = self._states.get(url)
        if state is not None:
            state.down_until = until
            state.failures += 1

    def mark_up(self, url: str) -> None:
        state = self._states.get(url)
        if state is not None:
            state.down_until = 0.0

    def record_load(self, url: str, load: Load) -> None:
        state = self._states.get(url)
        if state is not None:
            state.load = load

    def in_flight(self, url: str) -> int:
        state = self._states.get(url)
        return state.in_flight if state else 0

    def total_in_flight(self) -> int:
        return sum(s.in_flight for s in self._states.values())

    def loads(self) -> list[tuple[str, int, Load]]:
        """(url, in-flight, scraped load) of every worker, for metrics."""
        return [(s.url, s.in_flight, s.load) for s in self._states.values()]

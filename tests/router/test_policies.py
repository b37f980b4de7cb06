"""The routing policies: pure functions over frozen snapshots."""

from __future__ import annotations

import collections

import pytest

from tandem.router import endpoints, policies, settings
from tandem.router.endpoints import Endpoint, Load, Snapshot


def _eps(*loads: tuple[int, float, float]) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(f"http://w{i}", endpoints.url_key(f"http://w{i}"), n, Load(waiting=w, kv_usage=kv))
        for i, (n, w, kv) in enumerate(loads)
    )


IDLE = (0, 0.0, 0.0)
NO_FEATURES = policies.Features()


def test_empty_snapshot_selects_nothing() -> None:
    empty = Snapshot("decode", ())
    for policy in (policies.round_robin, policies.least_load, policies.prefix_aware):
        assert policy(policies.Features(10, 123), empty) is None


def test_round_robin_takes_turns() -> None:
    eps = _eps(IDLE, IDLE, IDLE)
    picked = [policies.round_robin(NO_FEATURES, Snapshot("decode", eps, t)) for t in range(6)]
    assert [e.url for e in picked if e] == ["http://w0", "http://w1", "http://w2"] * 2


def test_least_load_counts_in_flight_queue_and_kv() -> None:
    eps = _eps((3, 0.0, 0.0), (1, 1.0, 0.0), (0, 0.0, 0.9))
    # scores: 3, 2, 3.6
    assert policies.least_load(NO_FEATURES, Snapshot("decode", eps)) == eps[1]
    assert policies.score(eps[2]) == pytest.approx(0.9 * policies.KV_WEIGHT)


def test_least_load_rotates_among_ties() -> None:
    eps = _eps(IDLE, (5, 0.0, 0.0), IDLE)
    picked = {policies.least_load(NO_FEATURES, Snapshot("decode", eps, t)) for t in range(4)}
    assert picked == {eps[0], eps[2]}


def test_prefix_aware_is_sticky_per_prefix() -> None:
    eps = _eps(IDLE, IDLE, IDLE, IDLE)
    snapshot = Snapshot("prefill", eps)
    for key in range(50):
        first = policies.prefix_aware(policies.Features(0, key), snapshot)
        assert all(
            policies.prefix_aware(policies.Features(0, key), snapshot) == first for _ in range(3)
        )


def test_prefix_aware_spreads_different_prefixes() -> None:
    eps = _eps(IDLE, IDLE, IDLE, IDLE)
    snapshot = Snapshot("prefill", eps)
    counts = collections.Counter(
        policies.prefix_aware(policies.Features(0, key * 7919), snapshot) for key in range(400)
    )
    assert len(counts) == 4
    assert min(counts.values()) > 60  # ~100 each


def test_prefix_aware_keeps_its_choice_when_a_worker_goes_away() -> None:
    eps = _eps(IDLE, IDLE, IDLE, IDLE)
    keys = range(200)
    before = {
        k: policies.prefix_aware(policies.Features(0, k), Snapshot("prefill", eps)) for k in keys
    }
    survivors = eps[:3]
    for k in keys:
        after = policies.prefix_aware(policies.Features(0, k), Snapshot("prefill", survivors))
        if before[k] in survivors:
            assert after == before[k]  # rendezvous hashing moves only the lost worker's keys


def test_prefix_aware_bounds_the_load_of_a_hot_prefix() -> None:
    """Simulate 40 concurrent requests with one prefix over 4 workers."""
    urls = [f"http://w{i}" for i in range(4)]
    in_flight = dict.fromkeys(urls, 0)
    for _ in range(40):
        eps = tuple(Endpoint(u, endpoints.url_key(u), in_flight[u]) for u in urls)
        chosen = policies.prefix_aware(
            policies.Features(0, 42), Snapshot("prefill", eps), load_factor=1.25
        )
        assert chosen is not None
        in_flight[chosen.url] += 1
    assert max(in_flight.values()) <= 13  # ceil(1.25 * 40 / 4)
    assert min(in_flight.values()) >= 1


def test_prefix_aware_without_a_key_is_least_load() -> None:
    eps = _eps((2, 0.0, 0.0), IDLE)
    assert policies.prefix_aware(policies.Features(0, None), Snapshot("decode", eps)) == eps[1]


def test_prefix_aware_counts_the_engine_queue_in_its_bound() -> None:
    eps = _eps((0, 0.0, 0.0), (0, 0.0, 0.0))
    key = next(
        k
        for k in range(100)
        if policies.prefix_aware(policies.Features(0, k), Snapshot("prefill", eps)) == eps[0]
    )
    busy = _eps((0, 30.0, 0.0), IDLE)
    assert policies.prefix_aware(policies.Features(0, key), Snapshot("prefill", busy)) == busy[1]


@pytest.mark.parametrize("name", ["round-robin", "least-load", "prefix-aware"])
def test_make_builds_every_policy(name: settings.RoutingPolicy) -> None:
    policy = policies.make(name, settings.PrefixSettings())
    eps = _eps(IDLE)
    assert policy(policies.Features(1, 5), Snapshot("decode", eps)) == eps[0]

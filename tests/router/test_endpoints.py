"""EndpointSet: replace, count, cool down, snapshot."""

from __future__ import annotations

from tandem.router import endpoints


def test_replace_keeps_the_state_of_survivors() -> None:
    eps = endpoints.EndpointSet("decode")
    assert eps.replace(["http://a:1/", "http://b:1"])
    eps.acquire("http://a:1")
    eps.record_load("http://b:1", endpoints.Load(waiting=3))
    assert not eps.replace(["http://a:1", "http://b:1"])
    assert eps.replace(["http://b:1", "http://c:1"])
    assert eps.urls == ("http://b:1", "http://c:1")
    snap = eps.snapshot(0.0)
    assert [e.load.waiting for e in snap.endpoints] == [3, 0]
    eps.release("http://a:1")  # gone: ignored
    assert eps.total_in_flight() == 0


def test_in_flight_counts_in_snapshots() -> None:
    eps = endpoints.EndpointSet("prefill")
    eps.replace(["http://a:1"])
    eps.acquire("http://a:1")
    eps.acquire("http://a:1")
    eps.release("http://a:1")
    assert eps.snapshot(0.0).endpoints[0].in_flight == 1
    assert eps.in_flight("http://a:1") == 1
    eps.release("http://a:1")
    eps.release("http://a:1")  # never below zero
    assert eps.in_flight("http://a:1") == 0


def test_snapshot_skips_excluded_and_cooling_workers() -> None:
    eps = endpoints.EndpointSet("decode")
    eps.replace(["http://a:1", "http://b:1", "http://c:1"])
    eps.mark_down("http://b:1", until=10.0)
    urls = [e.url for e in eps.snapshot(5.0, frozenset({"http://a:1"})).endpoints]
    assert urls == ["http://c:1"]
    assert tuple(e.url for e in eps.snapshot(11.0).endpoints) == eps.urls  # cooled down
    eps.mark_down("http://a:1", until=10.0)
    eps.mark_down("http://c:1", until=10.0)
    assert len(eps.snapshot(5.0).endpoints) == 3  # all down: offer them all anyway
    eps.mark_up("http://a:1")
    assert [e.url for e in eps.snapshot(5.0).endpoints] == ["http://a:1"]


def test_snapshot_turn_advances() -> None:
    eps = endpoints.EndpointSet("decode")
    assert eps.snapshot(0).turn + 1 == eps.snapshot(0).turn

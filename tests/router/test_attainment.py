"""SLO attainment: the tracker (pure) and its gauges through the app (mocked workers)."""

from __future__ import annotations

from typing import Any

import httpx
import pydantic
import pytest

from tandem.router import app as router_app
from tandem.router import attainment, settings

from .fakes import Workers

D1, D2 = "http://d1:8000", "http://d2:8000"
MODEL = "m"


def test_shares_of_each_objective_and_of_both() -> None:
    t = attainment.Tracker(ttft=1.0, tpot=0.05, window=300)
    t.record(10.0, 0.5, 0.01)  # both met
    t.record(10.5, 2.0, 0.01)  # TTFT missed
    t.record(11.0, 0.5, 0.2)  # TPOT missed
    t.record(12.0, 1.0, None)  # exactly at the TTFT objective; one token: no TPOT to miss
    assert t.read(12.0) == attainment.Attainment(requests=4, ttft=0.75, tpot=0.75, both=0.5)


def test_no_traffic_is_no_share() -> None:
    t = attainment.Tracker(ttft=1.0, tpot=0.05, window=300)
    assert t.read(0.0) == attainment.Attainment(0, None, None, None)


def test_the_window_slides() -> None:
    t = attainment.Tracker(ttft=1.0, tpot=None, window=60)
    t.record(0.0, 5.0, None)  # missed
    t.record(30.0, 0.1, None)  # met
    assert t.read(59.0).both == 0.5
    assert t.read(61.0) == attainment.Attainment(1, 1.0, None, 1.0)  # the first left
    assert t.read(91.0).requests == 0
    # A slot is reused for its new bucket: old counts do not come back.
    t.record(120.0, 5.0, None)
    assert t.read(120.0) == attainment.Attainment(1, 0.0, None, 0.0)


def test_an_unset_objective_is_met_by_every_request() -> None:
    t = attainment.Tracker(ttft=None, tpot=0.05, window=10)
    t.record(1.0, 100.0, 0.01)
    t.record(1.0, 100.0, 0.1)
    assert t.read(1.0) == attainment.Attainment(2, None, 0.5, 0.5)


def test_memory_is_bounded_however_long_the_window() -> None:
    t = attainment.Tracker(ttft=1.0, tpot=None, window=24 * 3600)
    assert len(t._tick) == attainment.MAX_BUCKETS
    for second in range(0, 24 * 3600, 7):
        t.record(float(second), 0.1, None)
    assert t.read(24 * 3600.0 - 1).requests == len(range(0, 24 * 3600, 7))
    assert t.read(3 * 24 * 3600.0).requests == 0


def test_the_settings_need_an_objective() -> None:
    ok = settings.static_settings(MODEL, decode=[D1], slo={"ttft": 0.5})
    assert ok.slo == settings.SloSettings(ttft=0.5, tpot=None, percentile=90, window=300)
    with pytest.raises(pydantic.ValidationError, match="ttft or a tpot"):
        settings.static_settings(MODEL, decode=[D1], slo={"percentile": 99})
    assert settings.static_settings(MODEL, decode=[D1]).slo is None


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _app(workers: Workers, clock: Clock, **extra: Any) -> router_app.RouterApp:
    config = settings.static_settings(
        MODEL, decode=[D1, D2], mode="aggregated", policy="round-robin",
        scrape={"enabled": False}, **extra,
    )  # fmt: skip
    return router_app.create_app(config, transport=workers.transport(), clock=clock)


def _value(app: router_app.RouterApp, name: str, **labels: str) -> float | None:
    return app.metrics.registry.get_sample_value(name, {"pool": MODEL, **labels})


async def test_the_gauges_count_finished_streams_over_the_window() -> None:
    clock = Clock()
    workers = Workers()

    def slow(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        clock.now += 2.0  # the first token comes 2 s after arrival: TTFT missed
        return workers.default(body)

    workers.behaviour[D1] = slow
    slo = {"ttft": 1.0, "tpot": 0.05, "percentile": 90, "window": 300}
    app = _app(workers, clock, slo=slo)
    async with app.running():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            for _ in range(4):  # round robin: two on d1 (slow), two on d2
                r = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
                assert r.status_code == 200
            # Not streamed: no first token to time, not counted.
            await client.post("/v1/completions", json={"prompt": "hi"})
            assert _value(app, "tandem_router_slo_requests") == 4
            assert _value(app, "tandem_router_slo_attainment", objective="ttft") == 0.5
            assert _value(app, "tandem_router_slo_attainment", objective="tpot") == 1.0
            assert _value(app, "tandem_router_slo_attainment", objective="both") == 0.5
            assert _value(app, "tandem_router_slo_target") == 0.9
            text = (await client.get("/metrics")).text
            assert 'tandem_router_slo_attainment{objective="both",pool="m"} 0.5' in text
            clock.now += 301  # the window moved past them
            assert _value(app, "tandem_router_slo_requests") == 0
            assert _value(app, "tandem_router_slo_attainment", objective="both") is None
    assert _value(app, "tandem_router_ttft_seconds_count") == 4


async def test_without_an_slo_there_are_no_attainment_gauges() -> None:
    app = _app(Workers(), Clock())
    async with app.running():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
            text = (await client.get("/metrics")).text
    assert "tandem_router_slo" not in text
    assert app.metrics.slo is None

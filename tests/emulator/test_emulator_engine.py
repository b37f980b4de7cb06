"""The async engine loop on virtual time."""

from __future__ import annotations

import asyncio
import time

import pytest

from tandem.workers.emulator import engine, scheduling, simulation
from tandem.workers.emulator.scheduling import RequestSpec, SchedulerConfig


async def _collect(stream: engine.RequestStream) -> list[scheduling.TokenEvent]:
    try:
        return [token async for token in stream]
    finally:
        stream.abort()


async def test_the_loop_spends_the_same_time_as_the_replay() -> None:
    config = SchedulerConfig(max_num_seqs=2)
    specs = [RequestSpec(f"r{i}", 500 * (i + 1), 5 + i) for i in range(4)]
    clock = engine.VirtualClock()
    eng = engine.Engine(config, clock=clock)
    async with eng.running():
        streams = [eng.submit(spec) for spec in specs]
        results = await asyncio.gather(*(_collect(s) for s in streams))
    replay = simulation.simulate(config, [simulation.Arrival(0.0, s) for s in specs])
    for spec, tokens, stream in zip(specs, results, streams, strict=True):
        trace = replay.trace(spec.request_id)
        assert len(tokens) == spec.max_tokens
        assert [t.index for t in tokens] == list(range(spec.max_tokens))
        assert tokens[0].time == pytest.approx(trace.finished.first_token)
        assert tokens[-1].time == pytest.approx(trace.finished.last_token)
        assert tokens[-1].finish_reason is scheduling.FinishReason.LENGTH
        assert stream.finished is not None
    assert clock.now() == pytest.approx(replay.end_time)
    assert eng.stats() == scheduling.SchedulerStats(0, 0, 0.0)


async def test_overload_queues_requests_and_later_ones_wait_longer() -> None:
    eng = engine.Engine(SchedulerConfig(max_num_seqs=4), clock=engine.VirtualClock())
    async with eng.running():
        streams = [eng.submit(RequestSpec(f"r{i}", 2000, 20)) for i in range(32)]
        assert eng.stats().num_waiting == 32
        await asyncio.sleep(0)  # one turn of the loop: four admitted
        assert eng.stats().num_running == 4
        assert eng.stats().num_waiting == 28
        results = await asyncio.gather(*(_collect(s) for s in streams))
    ttfts = [tokens[0].since_last for tokens in results]
    assert ttfts == sorted(ttfts)
    assert ttfts[-1] > 5 * ttfts[0]


async def test_an_aborted_stream_leaves_the_engine_and_frees_its_kv() -> None:
    eng = engine.Engine(SchedulerConfig(), clock=engine.VirtualClock())
    async with eng.running():
        stream = eng.submit(RequestSpec("a", 1000, 10_000))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        assert eng.stats().num_running == 1
        stream.abort()
        assert eng.stats() == scheduling.SchedulerStats(0, 0, 0.0)
        other = eng.submit(RequestSpec("b", 10, 2))
        assert len(await _collect(other)) == 2
    assert stream.finished is None


async def test_an_idle_engine_wakes_for_a_landing_transfer() -> None:
    config = SchedulerConfig(kv_link_bandwidth=1e9)
    clock = engine.VirtualClock()
    eng = engine.Engine(config, clock=clock)
    async with eng.running():
        tokens = await _collect(eng.submit(RequestSpec("d", 1000, 2, remote_prefill=True)))
    assert tokens[0].time > config.transfer_time(1000)
    assert tokens[0].prompt == scheduling.PromptSources(1, 1000, 1)


async def test_a_request_that_cannot_fit_is_refused_at_submit() -> None:
    eng = engine.Engine(SchedulerConfig(num_gpu_blocks=2), clock=engine.VirtualClock())
    with pytest.raises(ValueError, match="KV blocks"):
        eng.submit(RequestSpec("big", 100, 1))


async def test_the_real_clock_runs_time_scale_times_faster() -> None:
    clock = engine.RealClock(time_scale=100.0)
    start_wall, start = time.monotonic(), clock.now()
    await clock.sleep(1.0)  # one emulated second, 10 ms of wall time
    assert clock.now() - start >= 1.0
    assert time.monotonic() - start_wall < 0.5
    with pytest.raises(ValueError, match="time_scale"):
        engine.RealClock(time_scale=0)

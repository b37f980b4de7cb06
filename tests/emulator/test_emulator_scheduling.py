"""The scheduler core and the replay: batching, KV blocks, overload, hand-over."""

from __future__ import annotations

import pytest

from tandem.workers.emulator import scheduling, simulation, timing
from tandem.workers.emulator.scheduling import RequestSpec, SchedulerConfig
from tandem.workers.emulator.simulation import Arrival

SHAPE, GPU = timing.LLAMA_3_1_8B, timing.H100


def _run(config: SchedulerConfig, *specs: RequestSpec) -> simulation.SimulationResult:
    return simulation.simulate(config, [Arrival(0.0, spec) for spec in specs])


def test_one_request_prefills_then_decodes_step_by_step() -> None:
    result = _run(SchedulerConfig(), RequestSpec("a", prompt_tokens=1000, max_tokens=4))
    trace = result.trace("a")
    prefill = timing.step_time(SHAPE, GPU, [timing.SeqWork(1000, 0)])
    assert trace.ttft == pytest.approx(prefill)
    decodes = [timing.decode_step_time(SHAPE, GPU, [1000 + i]) for i in range(3)]
    assert trace.e2e == pytest.approx(prefill + sum(decodes))
    assert trace.tpot == pytest.approx(sum(decodes) / 3)
    assert trace.finished.reason is scheduling.FinishReason.LENGTH
    assert trace.finished.generation_tokens == 4
    assert [s.step_tokens for s in result.samples] == [1000, 1, 1, 1]


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    config = SchedulerConfig(max_num_batched_tokens=4096)
    result = _run(config, RequestSpec("a", prompt_tokens=10_000, max_tokens=2))
    assert [s.step_tokens for s in result.samples] == [4096, 4096, 1808, 1]
    chunks = [timing.SeqWork(4096, 0), timing.SeqWork(4096, 4096), timing.SeqWork(1808, 8192)]
    expected = sum(timing.step_time(SHAPE, GPU, [c]) for c in chunks)
    assert result.trace("a").ttft == pytest.approx(expected)


def test_running_decodes_come_first_and_new_prompts_take_the_rest_of_the_budget() -> None:
    config = SchedulerConfig(max_num_batched_tokens=512)
    scheduler = scheduling.Scheduler(config)
    scheduler.add(RequestSpec("old", 100, 10), 0.0)
    step = scheduler.schedule(0.0)
    assert step is not None
    scheduler.complete(step, step.duration)
    scheduler.add(RequestSpec("new", 2000, 10), step.duration)
    step = scheduler.schedule(step.duration)
    assert step is not None
    assert step.work == (("old", 1, 100), ("new", 511, 0))


def test_max_num_seqs_caps_the_batch_and_the_rest_wait() -> None:
    scheduler = scheduling.Scheduler(SchedulerConfig(max_num_seqs=4))
    for i in range(10):
        scheduler.add(RequestSpec(f"r{i}", 100, 50), 0.0)
    step = scheduler.schedule(0.0)
    assert step is not None
    assert len(step.work) == 4
    assert scheduler.stats().num_running == 4
    assert scheduler.stats().num_waiting == 6


def test_a_full_kv_cache_keeps_requests_waiting_and_blocks_are_freed_at_the_end() -> None:
    # 20 blocks of 16 tokens: room for two requests of 100 + 50 tokens (10 blocks each).
    config = SchedulerConfig(num_gpu_blocks=20, block_size=16)
    scheduler = scheduling.Scheduler(config)
    for i in range(3):
        scheduler.add(RequestSpec(f"r{i}", 100, 50), 0.0)
    step = scheduler.schedule(0.0)
    assert step is not None
    assert [w[0] for w in step.work] == ["r0", "r1"]
    assert scheduler.stats().num_waiting == 1
    assert scheduler.stats().kv_usage == pytest.approx(14 / 20)  # ceil(100/16) = 7 blocks each
    result = _run(config, *(RequestSpec(f"r{i}", 100, 50) for i in range(3)))
    assert len(result.requests) == 3
    assert result.trace("r2").queue_time > 0
    final = scheduling.Scheduler(config)
    for i in range(3):
        final.add(RequestSpec(f"r{i}", 100, 50), 0.0)
    now = 0.0
    while final.has_work():
        step = final.schedule(now)
        assert step is not None
        now += step.duration
        final.complete(step, now)
    assert final.stats() == scheduling.SchedulerStats(0, 0, 0.0)


def test_decodes_that_outgrow_the_cache_preempt_the_newest_sequence() -> None:
    # Two sequences start within 8 blocks, then both grow: the newer one is preempted
    # and recomputed later, as vLLM's recompute preemption does.
    config = SchedulerConfig(num_gpu_blocks=8, block_size=16)
    scheduler = scheduling.Scheduler(config)
    scheduler.add(RequestSpec("old", 48, 60), 0.0)
    scheduler.add(RequestSpec("new", 48, 60), 0.0)
    preemptions = 0
    now = 0.0
    finished: list[str] = []
    while scheduler.has_work():
        step = scheduler.schedule(now)
        assert step is not None
        preemptions += step.num_preemptions
        now += step.duration
        finished += [f.request_id for f in scheduler.complete(step, now).finished]
    assert preemptions >= 1
    assert finished == ["old", "new"]


def test_an_aborted_request_frees_its_blocks() -> None:
    scheduler = scheduling.Scheduler(SchedulerConfig(num_gpu_blocks=100))
    scheduler.add(RequestSpec("a", 320, 10), 0.0)
    step = scheduler.schedule(0.0)
    assert step is not None
    assert scheduler.stats().kv_usage == pytest.approx(0.2)
    assert scheduler.abort("a")
    assert not scheduler.abort("a")
    assert scheduler.stats() == scheduling.SchedulerStats(0, 0, 0.0)
    assert scheduler.complete(step, step.duration).tokens == ()


def test_a_request_that_can_never_fit_is_refused() -> None:
    scheduler = scheduling.Scheduler(SchedulerConfig(num_gpu_blocks=4, block_size=16))
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add(RequestSpec("huge", 64, 1), 0.0)
    scheduler.add(RequestSpec("ok", 60, 1), 0.0)
    with pytest.raises(ValueError, match="already"):
        scheduler.add(RequestSpec("ok", 1, 1), 0.0)


def test_overload_makes_the_queue_grow_and_ttft_rise() -> None:
    # Prefill-heavy load at twice what one engine can serve.
    config = SchedulerConfig()
    prompt, output = 4000, 32
    one = simulation.simulate(config, [Arrival(0.0, RequestSpec("x", prompt, output))]).trace("x")
    capacity = 1.0 / one.ttft  # prefills per second, roughly
    gap = 1.0 / (2 * capacity)
    arrivals = [Arrival(i * gap, RequestSpec(f"r{i}", prompt, output)) for i in range(200)]
    result = simulation.simulate(config, arrivals)
    by_arrival = sorted(result.requests, key=lambda t: t.finished.arrival)
    first, last = by_arrival[:10], by_arrival[-10:]
    assert sum(t.ttft for t in last) > 20 * sum(t.ttft for t in first)
    early = [s.num_waiting for s in result.samples if s.time < 0.1 * result.end_time]
    late = [
        s.num_waiting
        for s in result.samples
        if 0.4 * result.end_time < s.time < 0.5 * result.end_time
    ]
    assert max(late) > max(early) + 20

    # Half the capacity: no queue to speak of, TTFT stays near one prefill.
    arrivals = [Arrival(i * 4 * gap, RequestSpec(f"r{i}", prompt, output)) for i in range(100)]
    calm = simulation.simulate(config, arrivals)
    assert max(s.num_waiting for s in calm.samples) <= 2
    assert max(t.ttft for t in calm.requests) < 3 * one.ttft


def test_remote_prefill_waits_for_the_transfer_then_computes_one_token() -> None:
    config = SchedulerConfig(kv_link_bandwidth=10e9)
    spec = RequestSpec("d", prompt_tokens=1000, max_tokens=3, remote_prefill=True)
    result = _run(config, spec)
    (transfer,) = result.transfers
    blocks = -(-1000 // 16)
    assert transfer.num_blocks == blocks
    assert transfer.num_bytes == blocks * 16 * 131072
    assert transfer.duration == pytest.approx(transfer.num_bytes / 10e9)
    first_step = timing.step_time(SHAPE, GPU, [timing.SeqWork(1, 999)])
    assert result.trace("d").ttft == pytest.approx(transfer.duration + first_step)
    assert result.samples[0].step_tokens == 1


def test_remote_prefill_tokens_count_as_external_and_transfers_share_the_link() -> None:
    scheduler = scheduling.Scheduler(SchedulerConfig(kv_link_bandwidth=1e9))
    for name in ("a", "b"):
        scheduler.add(RequestSpec(name, 160, 1, remote_prefill=True), 0.0)
    assert scheduler.schedule(0.0) is None  # both are on the link
    assert scheduler.stats().num_waiting == 2
    one = 10 * 16 * 131072 / 1e9
    assert scheduler.next_event_time() == pytest.approx(one)
    assert [t.request_id for t in scheduler.advance(one)] == ["a"]
    assert [t.request_id for t in scheduler.advance(2 * one)] == ["b"]
    step = scheduler.schedule(2 * one)
    assert step is not None
    tokens = scheduler.complete(step, 2 * one + step.duration).tokens
    assert tokens[0].prompt == scheduling.PromptSources(1, external_kv_transfer=160, recomputed=1)


def test_prefill_for_a_remote_decode_holds_its_blocks_until_they_are_read() -> None:
    config = SchedulerConfig(num_gpu_blocks=100, kv_link_bandwidth=1e9)
    scheduler = scheduling.Scheduler(config)
    scheduler.add(RequestSpec("p", 320, 1, remote_decode=True), 0.0)
    step = scheduler.schedule(0.0)
    assert step is not None
    done = scheduler.complete(step, step.duration)
    (finished,) = done.finished
    assert len(finished.kv_block_ids) == 20
    assert scheduler.stats().kv_usage == pytest.approx(0.2)
    release = scheduler.next_event_time()
    assert release == pytest.approx(step.duration + config.transfer_time(320))
    scheduler.advance(release)
    assert scheduler.stats().kv_usage == 0.0

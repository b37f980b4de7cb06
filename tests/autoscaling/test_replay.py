"""The replay simulator: its costs are the emulator's, its accounting adds up."""

from __future__ import annotations

import random

import pytest

from tandem import replay as r
from tandem.autoscaling import planner as a
from tandem.workers.emulator import timing

ENGINE = r.EngineModel()
CFG = r.ReplayConfig(engine=ENGINE)


def one(prompt: int, output: int, at: float = 0.0) -> r.Workload:
    return r.Workload("one", (r.Request(at, prompt, output),), duration=60.0)


@pytest.mark.parametrize("seed", range(5))
def test_step_cost_is_the_emulators_roofline(seed: int) -> None:
    rng = random.Random(seed)
    contexts = [rng.randint(1, 4000) for _ in range(rng.randint(1, 200))]
    chunks = [(rng.randint(1, 3000), rng.randint(0, 2000)) for _ in range(rng.randint(0, 3))]
    batch = [timing.SeqWork(1, c) for c in contexts] + [timing.SeqWork(n, c) for n, c in chunks]
    expected = timing.step_time(ENGINE.shape, ENGINE.gpu, batch) + ENGINE.step_overhead
    got = ENGINE.costs().step(len(contexts), sum(contexts), chunks)
    assert got == pytest.approx(expected, rel=1e-9)


def test_a_lone_request_costs_prefill_transfer_and_steps() -> None:
    res = r.replay(one(2000, 11), r.Static(1, 1), CFG)
    (o,) = res.outcomes
    costs = ENGINE.costs()
    prefill = costs.step(0, 0, [(2000, 0)])
    first_step = costs.step(1, 2000)
    assert o.ttft == pytest.approx(prefill + costs.transfer(2000) + first_step, rel=1e-6)
    assert o.tpot == pytest.approx(costs.step(1, 2005), rel=0.01)


def test_colocated_lone_request_has_no_transfer() -> None:
    (o,) = r.replay(one(2000, 11), r.Colocated(1), CFG).outcomes
    assert o.ttft == pytest.approx(ENGINE.costs().step(0, 0, [(2000, 0)]), rel=1e-6)


def test_long_prefill_stalls_colocated_decode() -> None:
    # One long generation, then a burst of 8k prompts: colocated, every one of them
    # stretches the steps of the generation; disaggregated, it does not notice.
    requests = (r.Request(0.0, 100, 400), *(r.Request(0.5 + i * 0.3, 8000, 2) for i in range(10)))
    wl = r.Workload("stall", requests, 10.0)
    colocated = r.replay(wl, r.Colocated(1), CFG).outcomes[0]
    split = r.replay(wl, r.Static(1, 1), CFG).outcomes[0]
    assert colocated.tpot > 1.5 * split.tpot
    assert split.tpot < 0.01


def test_every_request_finishes_and_gpu_seconds_add_up() -> None:
    wl = r.steady(rate=20, duration=120, seed=7)
    res = r.replay(wl, r.Static(2, 2), CFG)
    assert len(res.outcomes) == len(wl.requests)
    assert res.gpu_seconds == pytest.approx(4 * 120)
    assert res.attainment > 0.99


def test_replay_is_deterministic() -> None:
    wl = r.bursty(duration=600)
    spec = a.PlannerSpec(
        ttft=0.5, tpot=0.025, prefill=a.RoleBounds(1, 8), decode=a.RoleBounds(1, 8)
    )
    first = r.replay(wl, r.Tandem(1, 1, spec), CFG)
    second = r.replay(wl, r.Tandem(1, 1, spec), CFG)
    assert first.outcomes == second.outcomes
    assert first.decisions == second.decisions


def test_the_planner_scales_an_undersized_pool_up() -> None:
    wl = r.steady(rate=30, duration=600, seed=4)
    spec = a.PlannerSpec(
        ttft=0.5, tpot=0.025, percentile=99, prefill=a.RoleBounds(1, 8), decode=a.RoleBounds(1, 8)
    )
    res = r.replay(wl, r.Tandem(1, 1, spec), CFG)
    ups = [d for d in res.decisions if d.after > d.before]
    assert ups
    assert ups[0].role == "prefill"
    assert ups[0].reason.startswith("prefill 1→")
    assert res.timeline[-1].prefill >= 2
    late = [o for o in res.outcomes if o.request.arrival > 300]
    assert sum(o.ttft <= 0.5 for o in late) / len(late) > 0.99


def test_added_workers_cost_from_the_request_and_serve_after_the_delay() -> None:
    wl = r.steady(rate=30, duration=300, seed=4)
    spec = a.PlannerSpec(
        ttft=0.5, tpot=0.025, prefill=a.RoleBounds(1, 2), decode=a.RoleBounds(1, 1)
    )
    res = r.replay(wl, r.Tandem(1, 1, spec), r.ReplayConfig(provisioning_delay=100))
    (up,) = [d for d in res.decisions if d.role == "prefill"]
    assert res.gpu_seconds == pytest.approx(2 * 300 + (300 - up.time))
    before = [p.prefill for p in res.timeline if p.time < up.time]
    assert set(before) == {1}


def test_a_schedule_grows_a_delay_ahead_and_shrinks_on_time() -> None:
    wl = r.steady(rate=5, duration=600, seed=4)
    schedule = r.Scheduled(1, 1, ((200.0, 3, 1), (400.0, 1, 2)))
    res = r.replay(wl, schedule, r.ReplayConfig(provisioning_delay=50))
    moves = [(d.time, d.role, d.before, d.after) for d in res.decisions]
    assert moves == [(150.0, "prefill", 1, 3), (350.0, "decode", 1, 2), (400.0, "prefill", 3, 1)]
    sizes = {p.time: (p.prefill, p.decode) for p in res.timeline}
    assert sizes[195.0] == (3, 1)  # asked for at 150: they cost from then on
    assert sizes[420.0] == (1, 2)
    # Prefill: 1 for 600 s plus 2 from 150 to 400; decode: 1 for 600 s plus 1 from 350.
    assert res.gpu_seconds == pytest.approx(600 + 2 * 250 + 600 + 250, rel=0.01)
    assert len(res.outcomes) == len(wl.requests)


def test_hpa_follows_gpu_busy_time() -> None:
    wl = r.steady(rate=30, duration=600, seed=5)
    bounds = (a.RoleBounds(1, 8), a.RoleBounds(1, 8))
    res = r.replay(wl, r.Hpa(1, 1, bounds), CFG)
    assert any(d.role == "prefill" and d.after > d.before for d in res.decisions)
    assert all("GPU util" in d.reason for d in res.decisions)


@pytest.mark.parametrize(
    ("moves", "count"),
    [
        ([(0, 1, 2), (100, 2, 1), (200, 1, 2)], 1),  # up, down, up within 300s
        ([(0, 1, 2), (100, 2, 1), (400, 1, 2)], 0),  # the second up is too late
        ([(0, 1, 2), (50, 2, 3), (100, 3, 4)], 0),  # one direction
        ([(0, 2, 1), (60, 1, 2), (120, 2, 1), (180, 1, 2)], 2),
    ],
)
def test_oscillations(moves: list[tuple[float, int, int]], count: int) -> None:
    decisions = [r.Decision(t, "decode", b, c, "") for t, b, c in moves]
    assert r.oscillations(decisions, "decode", within=300) == count


@pytest.mark.parametrize("make", [r.steady, r.bursty, r.shifting])
def test_workloads_are_seeded_and_bounded(make: object) -> None:
    assert callable(make)
    first, second = make(duration=300), make(duration=300)
    assert first == second
    assert first.requests
    assert all(0 <= q.arrival < 300 for q in first.requests)
    assert all(q.prompt_tokens + q.output_tokens <= r.MAX_MODEL_LEN for q in first.requests)


def test_shifting_shifts() -> None:
    wl = r.shifting(duration=1200)
    early = [q for q in wl.requests if q.arrival < 300]
    late = [q for q in wl.requests if q.arrival > 900]
    assert sum(q.prompt_tokens for q in early) / len(early) > 5 * sum(
        q.prompt_tokens for q in late
    ) / len(late)
    assert sum(q.output_tokens for q in late) / len(late) > 5 * sum(
        q.output_tokens for q in early
    ) / len(early)

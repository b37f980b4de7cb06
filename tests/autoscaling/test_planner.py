"""The planner core, table-driven: each case is inputs held for a while, and the decision.

``hold(seconds, ...)`` feeds the same inputs every ``interval`` from t=0 to
t=seconds and returns the last plan; ``follow(...)`` also applies each decision
(workers ready at once), for cases about what happens after a scale.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tandem.autoscaling import capacity
from tandem.autoscaling import planner as a
from tandem.operator import api, validation

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SPEC = a.PlannerSpec(
    ttft=0.5,
    tpot=0.05,
    prefill=a.RoleBounds(1, 8),
    decode=a.RoleBounds(1, 16),
    interval=15,
    scale_up_stabilization=30,
    scale_down_stabilization=300,
    # Pinned, so that the expectations below do not move with the defaults.
    scale_down_ratio=0.7,
)


def role(
    replicas: int = 2, ready: int | None = None, warming: int = 0, **metrics: Any
) -> a.RoleInputs:
    ready = replicas if ready is None else ready
    m: a.RoleMetrics | a.MetricsUnavailable
    m = (
        a.MetricsUnavailable(metrics["unavailable"])
        if "unavailable" in metrics
        else a.RoleMetrics(**metrics)
    )
    return a.RoleInputs(replicas=replicas, ready=ready, warming=warming, metrics=m)


IDLE_P = role(2, ttft=0.2)
IDLE_D = role(2, tpot=0.02, kv_usage=0.3)


def hold(
    seconds: float,
    prefill: a.RoleInputs | None = IDLE_P,
    decode: a.RoleInputs = IDLE_D,
    spec: a.PlannerSpec = SPEC,
    state: a.PlannerState | None = None,
) -> a.Plan:
    ticks = int(seconds // spec.interval) + 1
    inputs = a.Inputs(decode=decode, prefill=prefill)
    return a.run(spec, ((i * spec.interval, inputs) for i in range(ticks)), state)[-1]


def pre(plan: a.Plan) -> a.RoleDecision:
    """The prefill decision of a plan that has one."""
    assert plan.prefill is not None
    return plan.prefill


@dataclass(frozen=True)
class Case:
    id: str
    seconds: float
    prefill: a.RoleInputs | None = IDLE_P
    decode: a.RoleInputs = IDLE_D
    spec: dict[str, Any] = field(default_factory=dict)
    expect_prefill: int | None = 2
    expect_decode: int | None = 2
    reason: str = ""
    """A substring of the prefill reason, or of the decode one after "decode:"."""


CASES = [
    # -- prefill follows TTFT and its queue
    Case("ttft-breach-scales-up", 30, prefill=role(2, ttft=0.7), expect_prefill=3,
         reason="prefill 2→3: TTFT p90 700ms > 500ms"),
    Case("ttft-breach-proportional", 30, prefill=role(2, ttft=0.82), expect_prefill=4,
         reason="prefill 2→4: TTFT p90 820ms > 500ms"),
    Case("ttft-breach-not-yet-lasted", 15, prefill=role(2, ttft=0.7), expect_prefill=2,
         reason="prefill holds at 2: TTFT p90 700ms > 500ms for 15s of 30s"),
    Case("objectives-have-no-tolerance", 30, prefill=role(2, ttft=0.52), expect_prefill=3,
         reason="prefill 2→3: TTFT p90 520ms > 500ms"),
    Case("ttft-on-objective", 60, prefill=role(2, ttft=0.5), expect_prefill=2,
         reason="on target"),
    Case("prefill-queue-scales-up", 30, prefill=role(2, ttft=0.3, queue_depth=12),
         expect_prefill=3, reason="queue 12 (target 8)"),
    Case("prefill-step-limit", 30, prefill=role(2, queue_depth=40), expect_prefill=4,
         reason="prefill 2→4"),
    Case("prefill-up-to-max", 30, prefill=role(7, queue_depth=200), expect_prefill=8,
         reason="prefill 7→8"),
    Case("prefill-at-max", 60, prefill=role(8, ttft=2.0), expect_prefill=8,
         reason="at replicas.max"),
    Case("prefill-ignores-tpot", 60, prefill=role(2, ttft=0.2, tpot=0.5), expect_prefill=2),
    # -- decode follows TPOT, KV usage and its queue
    Case("tpot-breach-scales-decode", 30, decode=role(2, tpot=0.08, kv_usage=0.3),
         expect_decode=4, reason="decode: decode 2→4: TPOT p90 80ms > 50ms"),
    Case("kv-pressure-scales-decode", 30, decode=role(4, tpot=0.02, kv_usage=0.95),
         expect_decode=5, reason="decode: decode 4→5: KV usage 95% > 80%"),
    Case("kv-within-tolerance", 60, decode=role(4, tpot=0.02, kv_usage=0.86),
         expect_decode=4, reason="decode: decode holds at 4: KV usage 86% > 80%: on target"),
    Case("decode-ignores-ttft", 60, decode=role(2, ttft=5.0, tpot=0.02, kv_usage=0.3),
         expect_decode=2),
    Case("decode-queue", 30, decode=role(2, tpot=0.02, kv_usage=0.5, queue_depth=10),
         expect_decode=3, reason="decode: decode 2→3: queue 10"),
    # -- scale-down: slack must last the window, highest recommendation, one step
    Case("decode-slack-not-yet", 285, decode=role(6, tpot=0.01, kv_usage=0.1), expect_decode=6,
         reason="decode: decode holds at 6: KV usage 10% <= 80%; room to spare for 4.75m of 5m"),
    Case("decode-slack-scales-down", 300, decode=role(6, tpot=0.01, kv_usage=0.1), expect_decode=5,
         reason="decode: decode 6→5: KV usage 10% <= 80%, room to spare for 5m"),
    Case("decode-down-projected", 300, decode=role(4, tpot=0.01, kv_usage=0.5), expect_decode=4,
         reason="decode: decode holds at 4: KV usage 50% <= 80%: on target"),
    Case("prefill-slack-scales-down", 300, prefill=role(4, ttft=0.1), expect_prefill=3),
    Case("prefill-down-respects-min", 600, prefill=role(1, ttft=0.01), expect_prefill=1),
    Case("load-sizes-the-pool-when-latency-is-comfortable", 300,
         decode=role(4, tpot=0.03, kv_usage=0.1), expect_decode=3,
         reason="decode: decode 4→3: KV usage 10% <= 80%"),
    Case("latency-near-objective-blocks-load-sizing", 300,
         decode=role(4, tpot=0.04, kv_usage=0.1), expect_decode=4,
         reason="decode: decode holds at 4: TPOT p90 40ms <= 50ms: on target"),
    Case("down-step-from-spec", 300, decode=role(8, tpot=0.005, kv_usage=0.05),
         spec={"max_scale_down_step": 3}, expect_decode=5),
    # -- pending and warming workers
    Case("pending-counts-as-capacity", 60, prefill=role(4, ready=2, ttft=0.8), expect_prefill=4,
         reason="2 worker(s) on the way"),
    Case("pending-latency-waits-for-them", 60, prefill=role(3, ready=2, ttft=1.0),
         expect_prefill=3, reason="1 worker(s) on the way"),
    Case("pending-short-of-forecast-load", 30,
         prefill=role(3, ready=2, ttft=1.0, prompt_token_rate=60_000),
         spec={"prefill_capacity": 10_000}, expect_prefill=5, reason="prefill 3→5: prompt load"),
    Case("warming-workers-hold-lagging-signals", 60, prefill=role(3, warming=1, ttft=2.0),
         expect_prefill=3, reason="TTFT p90 2s > 500ms; 1 worker(s) on the way"),
    Case("warming-samples-ignored", 60, prefill=role(2, warming=2, ttft=3.0), expect_prefill=2,
         reason="2 warming up, 0 starting: no signal from a warm worker yet"),
    Case("no-scale-down-while-starting", 600, decode=role(4, ready=3, tpot=0.01, kv_usage=0.05),
         expect_decode=4, reason="decode: waiting for starting workers"),
    # -- metrics unavailable: hold, never collapse to min
    Case("unavailable-holds", 900, prefill=role(6, unavailable="Prometheus unreachable"),
         expect_prefill=6,
         reason="prefill holds at 6: metrics unavailable (Prometheus unreachable); keeping"),
    Case("unavailable-decode-holds", 900, decode=role(9, unavailable="no series"), expect_decode=9),
    Case("no-requests-no-signal", 600, prefill=role(3), expect_prefill=2,
         reason="queue 0 (target 12)"),
    # -- policies
    Case("policy-off-holds-min", 0, prefill=role(5, ttft=9.0), decode=role(5, tpot=1.0),
         spec={"policy": "off"}, expect_prefill=1, expect_decode=1,
         reason="autoscaling off: holding replicas.min"),
    Case("policy-external-never-decides", 600, prefill=role(5, ttft=9.0), spec={"policy": "external"},
         expect_prefill=None, expect_decode=None, reason="policy external"),
    Case("policy-queue-ignores-ttft", 60, prefill=role(2, ttft=9.0, queue_depth=4),
         spec={"policy": "queue"}, expect_prefill=2),
    Case("policy-queue-follows-queue", 30, prefill=role(2, ttft=0.1, queue_depth=16),
         spec={"policy": "queue"}, expect_prefill=4),
    Case("policy-queue-ignores-kv", 60, decode=role(2, kv_usage=0.99), spec={"policy": "queue"},
         expect_decode=2),
    # -- bounds changed under the pool
    Case("below-min-at-once", 0, prefill=role(1, ttft=0.1), spec={"prefill": a.RoleBounds(3, 8)},
         expect_prefill=3, reason="below replicas.min 3"),
    Case("above-max-at-once", 0, decode=role(12), spec={"decode": a.RoleBounds(1, 10)},
         expect_decode=10, reason="decode: decode 12→10: above replicas.max 10"),
    # -- scale from zero (prefill min 0)
    Case("zero-stays-zero", 60, prefill=role(0), spec={"prefill": a.RoleBounds(0, 4)},
         expect_prefill=0),
    Case("zero-wakes-on-queue", 0, prefill=role(0, queue_depth=3),
         spec={"prefill": a.RoleBounds(0, 4)}, expect_prefill=1,
         reason="3 request(s) waiting and no worker"),
    # -- GPU budget: shared by pressure when both want more than it allows
    Case("budget-goes-to-pressure", 30, prefill=role(2, ttft=1.5), decode=role(2, tpot=0.07, kv_usage=0.5),
         spec={"gpu_budget": 6}, expect_prefill=4, expect_decode=2,
         reason="decode: decode holds at 2: TPOT p90 70ms > 50ms; GPU budget 6: wanted 3, got 2"),
    Case("budget-split", 30, prefill=role(2, ttft=1.0), decode=role(2, tpot=0.1, kv_usage=0.5),
         spec={"gpu_budget": 6}, expect_prefill=3, expect_decode=3),
    Case("budget-tp2", 30, prefill=role(2, ttft=1.0), decode=role(2, tpot=0.1, kv_usage=0.5),
         spec={"gpu_budget": 10, "decode": a.RoleBounds(1, 8, tensor_parallel_size=2)},
         expect_prefill=4, expect_decode=3),
    Case("budget-enough", 30, prefill=role(2, ttft=0.7), decode=role(2, tpot=0.07, kv_usage=0.5),
         spec={"gpu_budget": 16}, expect_prefill=3, expect_decode=3),
    Case("budget-lowered-sheds-least-pressed", 0, prefill=role(4, ttft=0.45), decode=role(4, tpot=0.01, kv_usage=0.2),
         spec={"gpu_budget": 6}, expect_prefill=4, expect_decode=2),
    # -- aggregated: no prefill pool, decode follows TTFT too
    Case("aggregated-decode-follows-ttft", 30, prefill=None,
         decode=role(2, ttft=1.0, tpot=0.02, kv_usage=0.3), spec={"aggregated": True},
         expect_prefill=None, expect_decode=4),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decision(case: Case) -> None:
    plan = hold(case.seconds, case.prefill, case.decode, replace(SPEC, **case.spec))
    got_prefill = plan.prefill.replicas if plan.prefill else None
    assert (got_prefill, plan.decode.replicas) == (case.expect_prefill, case.expect_decode), plan
    if case.reason.startswith("decode:"):
        assert case.reason.removeprefix("decode: ") in plan.decode.reason
    elif case.reason:
        assert plan.prefill is not None
        assert case.reason in plan.prefill.reason


# ---------------------------------------------------------------------------
# Decisions over time (each decision applied, workers ready at once)


Phase = tuple[float, dict[str, Any], dict[str, Any]]


def follow(
    spec: a.PlannerSpec,
    phases: Sequence[Phase],
    prefill: int = 2,
    decode: int = 2,
) -> list[a.Plan]:
    """``phases``: (seconds, prefill metrics, decode metrics); replicas follow the plans."""
    plans: list[a.Plan] = []
    state = a.PlannerState()
    now = 0.0
    for seconds, pm, dm in phases:
        end = now + seconds
        while now < end:
            plan = a.decide(
                spec, a.Inputs(decode=role(decode, **dm), prefill=role(prefill, **pm)), state, now
            )
            plans.append(plan)
            state = plan.state
            assert plan.prefill is not None
            assert plan.prefill.replicas is not None
            assert plan.decode.replicas is not None
            prefill, decode = plan.prefill.replicas, plan.decode.replicas
            now += spec.interval
    return plans


def sizes(plans: list[a.Plan], r: a.Role) -> list[int]:
    picked = [pre(p) if r == "prefill" else p.decode for p in plans]
    return [d.replicas if d.replicas is not None else -1 for d in picked]


def test_cooldown_after_scale_up() -> None:
    plans = follow(SPEC, [(120, {"ttft": 2.0}, {})])
    ups = [i * 15 for i, p in enumerate(plans) if p.prefill and p.prefill.action == "scale-up"]
    assert ups == [30, 60, 90]
    assert "cooling down for 30s" in pre(plans[3]).reason


def test_cooldown_does_not_block_the_other_role() -> None:
    plans = follow(SPEC, [(30, {"ttft": 2.0}, {}), (45, {"ttft": 2.0}, {"tpot": 0.2})])
    assert [p.decode.action for p in plans][-1] == "scale-up"


def test_intermittent_pressure_never_scales() -> None:
    phases: list[Phase] = [(15, {"ttft": 0.9}, {}), (15, {"ttft": 0.2}, {})] * 10
    assert set(sizes(follow(SPEC, phases), "prefill")) == {2}


def test_spike_in_window_blocks_scale_down() -> None:
    spike = {"tpot": 0.01, "kv_usage": 0.6}
    calm = {"tpot": 0.01, "kv_usage": 0.05}
    plans = follow(SPEC, [(240, {}, calm), (15, {}, spike), (285, {}, calm)], decode=6)
    assert sizes(plans, "decode")[-1] == 6
    assert "room to spare for 4.5m of 5m" in plans[-1].decode.reason


def test_settles_between_scale_downs() -> None:
    plans = follow(SPEC, [(600, {}, {"tpot": 0.01, "kv_usage": 0.02})], decode=8)
    downs = [i * 15 for i, p in enumerate(plans) if p.decode.action == "scale-down"]
    assert downs[:3] == [300, 360, 420]


def test_no_up_down_up_on_a_noisy_load() -> None:
    # Load wobbling around the target: the hysteresis band absorbs it.
    phases: list[Phase] = [
        (15, {}, {"tpot": 0.02, "kv_usage": kv}) for kv in [0.6, 0.75, 0.5, 0.85, 0.7, 0.55] * 30
    ]
    decode = sizes(follow(SPEC, phases, decode=4), "decode")
    changes = [b - a_ for a_, b in itertools.pairwise(decode) if b != a_]
    signs = [1 if c > 0 else -1 for c in changes]
    assert all(x == y for x, y in itertools.pairwise(signs)), decode


def test_unavailable_breaks_the_pressure_history() -> None:
    phases: list[Phase] = [
        (15, {"ttft": 0.9}, {}),
        (15, {"unavailable": "down"}, {}),
        (30, {"ttft": 0.9}, {}),
    ]
    plans = follow(SPEC, phases)
    assert sizes(plans, "prefill") == [2, 2, 2, 2]
    assert plans[1].prefill is not None
    assert not plans[1].prefill.metrics_available


def test_learns_prefill_capacity_when_saturated_then_sizes_by_load() -> None:
    saturated = role(2, ttft=2.0, queue_depth=30, prompt_token_rate=40_000)
    learned = hold(0, prefill=saturated).state
    assert learned.prefill.capacity == pytest.approx(20_000)
    # 30k tok/s on 4 workers is a load ratio of 0.5: 3 keep it under the 0.7 band;
    # TTFT alone (0.2 of the SLO) would have allowed 2.
    light = role(4, ttft=0.1, prompt_token_rate=30_000)
    assert pre(hold(300, prefill=light, state=learned)).recommendation == 3
    assert pre(hold(300, prefill=light)).recommendation == 2


def test_profiled_capacity_scales_up_before_ttft_breaks() -> None:
    spec = replace(SPEC, prefill_capacity=10_000)
    plan = hold(30, prefill=role(2, ttft=0.2, prompt_token_rate=24_000), spec=spec)
    assert plan.prefill is not None
    # No request rate, so no service time: the pool runs at up to 90% of capacity,
    # 2.4 workers of load need 3.
    assert plan.prefill.reason == "prefill 2→3: prompt load 24000 tok/s > 18000 tok/s"


def test_erlang_c_known_values() -> None:
    assert capacity.erlang_c(1, 0.3) == pytest.approx(0.3)  # M/M/1: P(wait) = utilization
    assert capacity.erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert capacity.erlang_c(3, 3.0) == 1.0  # saturated
    assert capacity.erlang_c(4, 0.0) == 0.0
    assert capacity.erlang_c(100, 90.0) < capacity.erlang_c(
        10, 9.0
    )  # same utilization, less waiting


SLO_SPEC = replace(SPEC, ttft=0.5, percentile=99, prefill_utilization=0.9)


def test_prefill_utilization_one_worker_matches_mm1() -> None:
    # M/M/1: P(W > t) = rho * exp(-(1 - rho) t / s) = 1% at the utilization found.
    service = 0.06
    rho = a.prefill_utilization(SLO_SPEC, 1, service)
    wait = SLO_SPEC.ttft - service
    assert rho * math.exp(-(1 - rho) * wait / service) == pytest.approx(0.01, rel=1e-3)
    assert 0.4 < rho < 0.55


@pytest.mark.parametrize(
    ("service", "expect"),
    [
        (None, [0.9] * 5),  # nothing to model: the cap
        (0.001, [0.9] * 5),  # service far below the objective: the cap everywhere
        (0.06, "rising"),
        (0.6, [0.05] * 5),  # the prefill alone is longer than the objective: the floor
    ],
)
def test_prefill_utilization_by_pool_size(service: float | None, expect: Any) -> None:
    got = [a.prefill_utilization(SLO_SPEC, n, service) for n in (1, 2, 4, 8, 16)]
    if expect == "rising":
        assert got == sorted(got)
        assert got[0] < 0.6
        assert got[-1] == 0.9
    else:
        assert got == pytest.approx(expect)


@pytest.mark.parametrize("offered", [0.3, 0.9, 1.0, 2.5, 7.2, 15.0])
def test_prefill_workers_needed_is_the_smallest_pool_that_fits(offered: float) -> None:
    service = 0.06
    needed = a.prefill_workers_needed(SLO_SPEC, offered, service)
    n = math.ceil(needed)
    assert offered <= n * a.prefill_utilization(SLO_SPEC, n, service) + 1e-9
    if n > 1:
        assert offered > (n - 1) * a.prefill_utilization(SLO_SPEC, n - 1, service)


def test_budget_refusal_is_reported_as_limited() -> None:
    plan = hold(
        30, prefill=role(3, ttft=2.0), decode=role(3, tpot=0.2), spec=replace(SPEC, gpu_budget=6)
    )
    assert plan.limited
    assert plan.prefill is not None
    assert plan.prefill.limited_by == "gpu-budget"
    assert plan.prefill.replicas == 3
    assert plan.decode.replicas == 3


def test_step_limit_is_reported() -> None:
    plan = hold(30, prefill=role(2, queue_depth=40))
    assert plan.prefill is not None
    assert plan.prefill.limited_by == "step"


def test_from_api() -> None:
    spec = api.InferencePoolSpec.model_validate(
        {"model": {"name": "m"}, "slo": {"ttft": "500ms", "tpot": "50ms", "percentile": 99},
         "prefill": {"replicas": {"min": 1, "max": 8}, "tensorParallelSize": 2},
         "autoscaling": {"policy": "queue", "scaleDownStabilization": "2m", "gpuBudget": 32}}
    )  # fmt: skip
    planner = a.PlannerSpec.from_api(spec, kv_target=0.9)
    assert (planner.ttft, planner.tpot, planner.percentile_label) == (0.5, 0.05, "p99")
    assert planner.prefill == a.RoleBounds(1, 8, 2)
    assert (planner.policy, planner.scale_down_stabilization, planner.gpu_budget) == (
        "queue",
        120,
        32,
    )
    assert (planner.settle, planner.kv_target) == (60, 0.9)


def test_from_api_carries_the_profiled_settings() -> None:
    # The example for an H100 sets what the benchmark's `tandem` row runs with.
    (pool,) = validation.load_pools(EXAMPLES / "llama-8b-h100.yaml")
    planner = a.PlannerSpec.from_api(pool.spec)
    assert planner.lead == 75
    assert planner.prefill_capacity == 33581
    assert planner.tpot_line == pytest.approx((0.0079, 0.0281))
    assert (planner.load_tolerance, planner.load_scale_down_ratio) == (0, 1)
    assert (planner.scale_up_stabilization, planner.scale_down_stabilization) == (15, 180)
    # Unset, each is off (or learned while serving).
    (tiny,) = validation.load_pools(EXAMPLES / "tiny.yaml")
    plain = a.PlannerSpec.from_api(tiny.spec)
    assert (plain.lead, plain.prefill_capacity, plain.tpot_line) == (0, None, None)
    assert (plain.load_tolerance, plain.load_scale_down_ratio) == (None, None)


def test_pure_same_inputs_same_plan() -> None:
    first, second = hold(300, prefill=role(3, ttft=0.9)), hold(300, prefill=role(3, ttft=0.9))
    assert first == second


def test_kv_target_follows_the_tpot_line() -> None:
    # TPOT = 8ms + 30ms * KV usage: the objective (50ms) is reached at 140% KV, so the
    # fit does not bind; with a 20ms objective it is reached at 40% (target 32%).
    pairs = tuple((k / 20, 0.008 + 0.030 * k / 20) for k in range(10))
    state = a.RoleState(samples=pairs)
    assert a.kv_at_tpot_objective(SPEC, state) == pytest.approx(1.4)
    tight = replace(SPEC, tpot=0.02)
    assert a.kv_at_tpot_objective(tight, state) == pytest.approx(0.4)
    (kv,) = [
        p for p in a.pressures(tight, "decode", role(2, kv_usage=0.4), state) if p.signal == "kv"
    ]
    assert kv.target == pytest.approx(0.32)


@pytest.mark.parametrize(
    "pairs",
    [
        (),  # nothing yet
        tuple((0.3, 0.02) for _ in range(10)),  # no spread in KV usage
        tuple((k / 20, 0.03 - k / 1000) for k in range(10)),  # TPOT falls with KV: noise
    ],
)
def test_kv_fit_needs_evidence(pairs: tuple[tuple[float, float], ...]) -> None:
    assert a.kv_at_tpot_objective(SPEC, a.RoleState(samples=pairs)) is None


def test_lead_forecasts_rising_kv() -> None:
    spec = replace(SPEC, lead=90, settle=60)
    plans = a.run(
        spec, [(t, a.Inputs(decode=role(2, kv_usage=0.2 + t / 300))) for t in (0, 15, 30)]
    )
    assert plans[-1].decode.reason.startswith(
        "decode holds at 2: KV usage 30% (rising: 60% in 1.5m)"
    )
    # The same rise without a lead is no pressure at all.
    plans = a.run(
        SPEC, [(t, a.Inputs(decode=role(2, kv_usage=0.2 + t / 300))) for t in (0, 15, 30)]
    )
    assert "rising" not in plans[-1].decode.reason


def test_lead_never_forecasts_a_fall() -> None:
    spec = replace(SPEC, lead=90, settle=60)
    plans = a.run(
        spec, [(t, a.Inputs(decode=role(2, kv_usage=0.6 - t / 300))) for t in (0, 15, 30, 45)]
    )
    assert "rising" not in plans[-1].decode.reason


def test_lead_follows_the_fitted_trend_of_the_whole_window() -> None:
    # Noisy samples of a rise: the forecast follows the least-squares slope through
    # all of them, not the line between the oldest sample and this one.
    spec = replace(SPEC, lead=75, settle=60)
    past = [(0.0, 0.40), (15.0, 0.49), (30.0, 0.50), (45.0, 0.52)]
    ts, vs = zip(*past, (60.0, 0.50), strict=True)
    fitted = statistics.linear_regression(ts, vs).slope
    assert fitted != pytest.approx((0.50 - 0.40) / 60)  # the two ends alone say otherwise
    assert a._ahead(spec, past, 0.50, 60.0) == pytest.approx(0.50 + fitted * 75)
    # A steady rise is followed in full; a fall is not followed at all.
    rise = [(t, 0.2 + t / 300) for t in (0.0, 15.0, 30.0, 45.0)]
    assert a._ahead(spec, rise, 0.4, 60.0) == pytest.approx(0.4 + 75 / 300)
    assert a._ahead(spec, [(t, 0.6 - t / 300) for t, _ in rise], 0.4, 60.0) == 0.4


@pytest.mark.parametrize("queue", [0.0, 40.0])
def test_a_line_draining_onto_new_workers_is_no_rise_in_demand(queue: float) -> None:
    # Load rising on 4 workers: with no line (0 queued) it is demand, and is
    # forecast; with a line over its target (40 > 4 x 4) the pool serves at its
    # capacity, and the rise is the line moving onto the workers that just joined.
    spec = replace(SPEC, lead=90, settle=60, prefill_capacity=30_000)

    def inputs(t: float) -> a.Inputs:
        return a.Inputs(
            prefill=role(4, ttft=0.3, queue_depth=queue, prompt_token_rate=40_000 + 400 * t),
            decode=role(4, tpot=0.02, kv_usage=0.2 + t / 300, queue_depth=queue),
        )

    last = a.run(spec, [(t, inputs(t)) for t in (0, 15, 30, 45)])[-1]
    now = inputs(45)
    for name, state, signal, measured in (
        ("decode", last.state.decode, "kv", 0.35),
        ("prefill", last.state.prefill, "load", 58_000),
    ):
        role_inputs = now.decode if name == "decode" else now.prefill
        assert role_inputs is not None
        (p,) = [p for p in a.pressures(spec, name, role_inputs, state, 45) if p.signal == signal]
        if queue == 0:
            assert p.observed > measured * 1.2
        else:
            assert p.observed == pytest.approx(measured)


def test_ttft_breach_teaches_prefill_capacity() -> None:
    plan = hold(0, prefill=role(3, ttft=0.6, prompt_token_rate=90_000))
    assert plan.state.prefill.capacity == pytest.approx(30_000)


LINE = (0.008, 0.028)
"""TPOT = 8 ms + 28 ms x KV usage: about an H100's decode step for an 8B model."""


def test_fewer_decode_workers_hold_more_than_their_share() -> None:
    # 3 workers at 21% each: 14 ms steps. On 2, steps grow with the KV each holds,
    # sequences stay longer, and each holds about 49% (not 31.5%).
    rate = capacity.decode_rate(0.21, 3, LINE)
    assert capacity.kv_usage_on(rate, 3, LINE) == pytest.approx(0.21)
    assert capacity.kv_usage_on(rate, 2, LINE) == pytest.approx(0.49, abs=0.01)
    assert capacity.kv_usage_on(rate, 1, LINE) == math.inf  # one worker cannot carry it
    # So a 42% target needs 3 workers, where usage in proportion says 2 (1.5).
    assert capacity.decode_workers_needed(rate, 0.42, LINE) == pytest.approx(2.13, abs=0.01)
    assert capacity.decode_workers_needed(
        capacity.decode_rate(0.21, 3, None), 0.42, None
    ) == pytest.approx(1.5)
    # On target, the workers needed are the workers there are, line or not.
    for line in (LINE, None):
        assert capacity.decode_workers_needed(
            capacity.decode_rate(0.42, 4, line), 0.42, line
        ) == pytest.approx(4)


def test_a_decode_pool_is_not_shrunk_onto_a_size_the_tpot_line_overloads() -> None:
    spec = replace(SPEC, tpot=0.025, tpot_line=LINE, tpot_headroom=0.7, scale_down_ratio=1.0)
    # The target: 70% of the usage at which the line reaches 25 ms (60.7%): 42.5%.
    idle = role(3, tpot=0.012, kv_usage=0.21)
    (kv,) = [p for p in a.pressures(spec, "decode", idle, a.RoleState()) if p.signal == "kv"]
    assert kv.target == pytest.approx(0.425, abs=0.001)
    assert hold(900, prefill=None, decode=idle, spec=spec).decode.action == "hold"
    # Without the line, the same usage looks like room for a worker less.
    flat = replace(spec, tpot_line=None)
    assert hold(900, prefill=None, decode=idle, spec=flat).decode.action == "scale-down"


def test_a_profiled_tpot_line_caps_a_flatter_fitted_one() -> None:
    # A lightly loaded pool's ticks fit a line far too flat (objective at 140%).
    pairs = tuple((k / 20, 0.008 + 0.030 * k / 20) for k in range(10))
    state = a.RoleState(samples=pairs)
    assert a.tpot_line(SPEC, state) == pytest.approx((0.008, 0.030))
    profiled = replace(SPEC, tpot_line=(0.010, 0.1))  # objective at 40%
    assert a.tpot_line(profiled, state) == (0.010, 0.1)
    assert a.kv_at_tpot_objective(profiled, state) == pytest.approx(0.4)
    # A fitted line that is steeper than the profile wins.
    assert a.tpot_line(replace(SPEC, tpot_line=(0.008, 0.001)), state) == pytest.approx(
        (0.008, 0.030)
    )
    assert a.tpot_line(profiled, a.RoleState()) == (0.010, 0.1)


@pytest.mark.parametrize(
    ("load_tolerance", "action"),
    [(None, "hold"), (0.0, "scale-up")],
)
def test_load_tolerance_acts_on_kv_at_its_target(load_tolerance: float | None, action: str) -> None:
    # KV 5% over its target (80%): inside the 10% tolerance, past a load tolerance of 0.
    spec = replace(SPEC, load_tolerance=load_tolerance)
    plan = hold(60, prefill=None, decode=role(2, tpot=0.02, kv_usage=0.84), spec=spec)
    assert plan.decode.action == action
    # TPOT has no tolerance either way.
    assert (
        hold(60, prefill=None, decode=role(2, tpot=0.051, kv_usage=0.3), spec=spec).decode.action
        == "scale-up"
    )


def test_load_scale_down_ratio_sets_the_load_band() -> None:
    # 4 workers at 55% KV (target 80%): 2.75 workers' worth. The 0.7 band keeps 4
    # (2.75 / 0.7 = 3.9); a band of 1 lets the pool go to 3.
    busy = role(4, tpot=0.02, kv_usage=0.55)
    assert hold(900, prefill=None, decode=busy).decode.action == "hold"
    spec = replace(SPEC, load_scale_down_ratio=1.0)
    plan = hold(900, prefill=None, decode=busy, spec=spec)
    assert (plan.decode.action, plan.decode.replicas) == ("scale-down", 3)

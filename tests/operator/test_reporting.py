"""The status writers' shared pieces, and that both writers go through them."""

from __future__ import annotations

from typing import Any

from tandem.autoscaling import planner, signals
from tandem.operator import api, autoscaler, conditions, reporting

from .test_conditions import obs

NOW = "2026-01-02T03:04:05Z"
EARLIER = "2026-01-01T00:00:00Z"


def test_a_condition_keeps_its_transition_time_while_the_status_holds() -> None:
    previous = [{"type": "Ready", "status": "True", "lastTransitionTime": EARLIER}]
    held = reporting.condition(
        "Ready", True, "Serving", "reworded", generation=2, previous=previous, now=NOW
    )
    assert held == api.Condition(
        type="Ready",
        status="True",
        reason="Serving",
        message="reworded",
        observed_generation=2,
        last_transition_time=EARLIER,
    )


def test_a_condition_moves_its_transition_time_with_the_status() -> None:
    previous = [
        {"type": "Ready", "status": "True", "lastTransitionTime": EARLIER},
        {"type": "Degraded", "status": "False"},  # written without a time
    ]

    def at(type_: api.ConditionType, ok: bool) -> str | None:
        cond = reporting.condition(type_, ok, "X", "", generation=1, previous=previous, now=NOW)
        return cond.last_transition_time

    assert at("Ready", False) == NOW
    assert at("Degraded", False) == NOW
    assert at("Progressing", True) == NOW  # new


def test_dump_writes_only_what_was_set() -> None:
    status = api.InferencePoolStatus(
        prefill=api.RoleStatus(
            last_decision=api.ScalingDecision(time=NOW, from_replicas=1, to_replicas=2, reason="r")
        ),
        observed=api.ObservedLatency(ttft="3s", ttft_seconds=3.0, tpot=None),
    )
    assert reporting.dump(status) == {
        "prefill": {
            "lastDecision": {"time": NOW, "fromReplicas": 1, "toReplicas": 2, "reason": "r"}
        },
        "observed": {"ttft": "3s", "ttftSeconds": 3.0},
    }


def test_changed_by_key_except_for_a_map_owned_whole() -> None:
    wanted = {"observed": {"ttft": "1s"}, "conditions": [{"type": "Ready", "status": "True"}]}
    current: dict[str, Any] = {
        "observed": {"ttft": "1s", "tpot": "5ms"},
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": EARLIER},
            {"type": "Degraded", "status": "False"},
        ],
    }
    assert not reporting.changed(wanted, current)
    assert reporting.changed(wanted, current, whole=("observed",))  # tpot would go
    assert reporting.changed({**wanted, "observed": {"ttft": "2s"}}, current)


def _previous() -> dict[str, Any]:
    return {
        "conditions": [
            {"type": t, "status": s, "lastTransitionTime": EARLIER}
            for t, s in [
                ("Ready", "True"),
                ("Progressing", "True"),  # now False: moves
                ("Degraded", "False"),
                ("MetricsAvailable", "False"),
                ("ScalingLimited", "True"),  # now False: moves
            ]
        ]
    }


def _times(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["lastTransitionTime"] for c in status["conditions"]}


def test_the_operator_writes_its_conditions_through_the_helper() -> None:
    assert _times(conditions.status(obs(), _previous(), NOW)) == {
        "Ready": EARLIER,
        "Progressing": NOW,
        "Degraded": EARLIER,
    }
    invalid = conditions.invalid_status(3, "bad", _previous(), NOW)
    assert _times(invalid) == {"Ready": NOW, "Progressing": NOW, "Degraded": NOW}


def test_the_autoscaler_writes_its_conditions_through_the_helper() -> None:
    assert _times(autoscaler.disabled_status(3, _previous(), NOW)) == {"MetricsAvailable": EARLIER}
    down = planner.MetricsUnavailable("refused", "PrometheusUnreachable")
    readings = {"decode": signals.Reading("decode", None, down.reason, down.cause)}
    plan = planner.decide(
        planner.PlannerSpec(),
        planner.Inputs(decode=readings["decode"].inputs(1, 1)),
        planner.PlannerState(),
        0.0,
    )
    wanted = autoscaler.status(plan, readings, 3, _previous(), NOW)
    assert _times(wanted) == {"MetricsAvailable": EARLIER, "ScalingLimited": NOW}


def test_the_autoscaler_status_is_what_it_was_before_the_models() -> None:
    """The body applied, key for key: the models' defaults (replicas 0, ...) stay out,
    so the autoscaler never claims a field the operator owns."""
    last = {"time": EARLIER, "fromReplicas": 1, "toReplicas": 2, "reason": "TTFT"}
    previous = {"decode": {"replicas": 2, "summary": "2/2", "lastDecision": last}}
    snapshot = signals.Snapshot(targets=1, warm=1, tpot=0.05, kv_usage=0.3)
    readings = {"decode": signals.Reading("decode", snapshot)}
    plan = planner.decide(
        planner.PlannerSpec(decode=planner.RoleBounds(1, 4)),
        planner.Inputs(decode=readings["decode"].inputs(2, 2)),
        planner.PlannerState(),
        0.0,
    )
    assert autoscaler.status(plan, readings, 3, previous, NOW) == {
        "decode": {"lastDecision": last},
        "conditions": [
            {
                "type": "MetricsAvailable",
                "status": "True",
                "reason": "Measured",
                "message": "workers scraped: decode 1/1 warm",
                "observedGeneration": 3,
                "lastTransitionTime": NOW,
            },
            {
                "type": "ScalingLimited",
                "status": "False",
                "reason": "WithinBounds",
                "message": "",
                "observedGeneration": 3,
                "lastTransitionTime": NOW,
            },
        ],
        "observed": {"tpot": "50ms", "tpotSeconds": 0.05, "queueDepth": 0.0},
    }
    assert autoscaler.disabled_status(3, previous, NOW)["decode"] == {"lastDecision": last}


def test_a_last_decision_the_schema_would_refuse_is_not_sent_again() -> None:
    previous = {"prefill": {"lastDecision": {"time": EARLIER}}}
    assert "prefill" not in autoscaler.disabled_status(3, previous, NOW)

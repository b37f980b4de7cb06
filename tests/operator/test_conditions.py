from __future__ import annotations

from typing import Any

import pytest

from tandem.operator import conditions, reporting
from tandem.operator.conditions import Observation, Problem, Workload

NOW = "2026-01-02T03:04:05Z"
EARLIER = "2026-01-01T00:00:00Z"


def ready(n: int = 1) -> Workload:
    return Workload(exists=True, desired=n, replicas=n, ready=n, updated=n, generation=2,
                    observed_generation=2)  # fmt: skip


def pending(n: int = 1) -> Workload:
    return Workload(exists=True, desired=n, replicas=n, ready=0, updated=n, generation=1,
                    observed_generation=1)  # fmt: skip


def obs(
    mode: str = "disaggregated", problems: tuple[Problem, ...] = (), **w: Workload
) -> Observation:
    workloads: dict[Any, Workload] = {"prefill": ready(), "decode": ready(), "router": ready()}
    if mode == "aggregated":
        del workloads["prefill"]
    workloads.update(w)
    return Observation(generation=7, mode=mode, workloads=workloads,
                       endpoint="http://p.ns.svc/v1", problems=problems)  # fmt: skip


def by_type(conds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conds}


def test_all_ready() -> None:
    c = by_type(conditions.conditions(obs(), [], NOW))
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "Serving")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("False", "Complete")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("False", "AsExpected")
    assert {x["observedGeneration"] for x in c.values()} == {7}
    assert {x["lastTransitionTime"] for x in c.values()} == {NOW}


def test_nothing_ready_yet() -> None:
    c = by_type(conditions.conditions(
        obs(prefill=pending(), decode=pending(2), router=pending()), [], NOW))  # fmt: skip
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "PrefillNotReady")
    assert "prefill, decode, router" in c["Ready"]["message"]
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", "WaitingForReady")


def test_auto_mode_serves_without_prefill() -> None:
    c = by_type(conditions.conditions(obs("auto", prefill=pending()), [], NOW))
    assert c["Ready"]["status"] == "True"


def test_a_role_scaled_to_zero_does_not_block_ready() -> None:
    zero = Workload(exists=True, desired=0, generation=1, observed_generation=1)
    assert by_type(conditions.conditions(obs(prefill=zero), [], NOW))["Ready"]["status"] == "True"


def test_missing_deployment_is_creating() -> None:
    c = by_type(conditions.conditions(obs(decode=Workload()), [], NOW))
    assert (c["Progressing"]["reason"], c["Ready"]["reason"]) == ("Creating", "DecodeNotReady")


@pytest.mark.parametrize(
    ("workload", "reason"),
    [
        (Workload(exists=True, desired=1, replicas=1, ready=1, updated=1, generation=3,
                  observed_generation=2), "RollingOut"),
        (Workload(exists=True, desired=2, replicas=2, ready=2, updated=1, generation=2,
                  observed_generation=2), "RollingOut"),
        (Workload(exists=True, desired=3, replicas=2, ready=2, updated=3, generation=2,
                  observed_generation=2), "ScalingUp"),
        (Workload(exists=True, desired=1, replicas=2, ready=1, updated=1, generation=2,
                  observed_generation=2), "ScalingDown"),
    ],
)  # fmt: skip
def test_progressing_reasons(workload: Workload, reason: str) -> None:
    c = by_type(conditions.conditions(obs(decode=workload), [], NOW))
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", reason)


def test_problems_make_it_degraded() -> None:
    problems = (Problem("ChildConflict", "Service ns/p exists"), Problem("ApplyFailed", "boom"))
    c = by_type(conditions.conditions(obs(problems=problems), [], NOW))
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "ChildConflict")
    assert c["Degraded"]["message"] == "Service ns/p exists; boom"


def test_a_stuck_rollout_is_degraded() -> None:
    deployment = {
        "metadata": {"generation": 1},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "replicas": 1, "conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": "ReplicaSet \"x\" has timed out progressing."},
        ]},
    }  # fmt: skip
    c = by_type(conditions.conditions(obs(decode=Workload.of(deployment)), [], NOW))
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == (
        "True",
        "ProgressDeadlineExceeded",
    )
    assert "timed out" in c["Degraded"]["message"]


def test_a_deployment_failure_carries_its_reason() -> None:
    stuck = Workload(exists=True, failure=Problem("ReplicaFailure", "quota: exceeded: pods"))
    c = by_type(conditions.conditions(obs(decode=stuck), [], NOW))
    assert (c["Degraded"]["reason"], c["Degraded"]["message"]) == (
        "ReplicaFailure",
        "decode: quota: exceeded: pods",
    )


def test_transition_time_moves_only_with_status() -> None:
    previous = [
        {"type": "Ready", "status": "True", "lastTransitionTime": EARLIER},
        {"type": "Degraded", "status": "True", "lastTransitionTime": EARLIER},
    ]
    c = by_type(conditions.conditions(obs(), previous, NOW))
    assert c["Ready"]["lastTransitionTime"] == EARLIER
    assert c["Degraded"]["lastTransitionTime"] == NOW
    assert c["Progressing"]["lastTransitionTime"] == NOW


def test_workload_of_a_deployment() -> None:
    w = Workload.of({"metadata": {"generation": 4}, "spec": {"replicas": 3},
                     "status": {"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3,
                                "observedGeneration": 4}})  # fmt: skip
    assert (w.desired, w.replicas, w.ready, w.summary()) == (3, 3, 2, "2/3")
    assert Workload.of(None) == Workload()
    assert Workload.of({"metadata": {}, "spec": {}}).desired == 1  # the API server's default


def test_status_fields() -> None:
    status = conditions.status(obs("aggregated", decode=pending(2)), {}, NOW)
    assert status["observedGeneration"] == 7
    assert status["endpoint"] == "http://p.ns.svc/v1"
    assert status["decode"] == {"replicas": 2, "readyReplicas": 0, "desiredReplicas": 2,
                                "summary": "0/2"}  # fmt: skip
    assert status["prefill"]["summary"] == "-"
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Progressing", "Degraded"]


def test_invalid_status() -> None:
    status = conditions.invalid_status(3, "spec.mode: bad", {}, NOW)
    c = by_type(status["conditions"])
    assert status["observedGeneration"] == 3
    assert {x["reason"] for x in c.values()} == {"InvalidSpec"}
    assert c["Degraded"]["status"] == "True"


def test_changed_ignores_other_writers() -> None:
    wanted = conditions.status(obs(), {}, NOW)
    current: dict[str, Any] = {
        **wanted,
        "conditions": [*wanted["conditions"], {"type": "ScalingLimited", "status": "True"}],
        "decode": {**wanted["decode"], "lastDecision": {"reason": "autoscaler's"}},
        "observed": {"ttft": "120ms"},
    }
    assert not reporting.changed(wanted, current)
    assert reporting.changed(wanted, {**current, "observedGeneration": 6})
    assert reporting.changed(wanted, {**current, "conditions": current["conditions"][1:]})
    assert reporting.changed(wanted, {})

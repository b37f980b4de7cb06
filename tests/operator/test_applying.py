from __future__ import annotations

import copy

import pytest

from tandem.operator import applying

from .conftest import PoolFactory, live_copy, planned


def test_replicas_are_sent_when_creating_a_worker_deployment(make_pool: PoolFactory) -> None:
    decode = planned(make_pool())[("Deployment", "tiny-decode")]
    assert applying.prepare(decode, None)["spec"]["replicas"] == 1


def test_replicas_are_dropped_once_the_worker_deployment_exists(make_pool: PoolFactory) -> None:
    decode = planned(make_pool())[("Deployment", "tiny-decode")]
    live = live_copy(decode)
    live["spec"]["replicas"] = 5  # the autoscaler's
    prepared = applying.prepare(decode, live)
    assert "replicas" not in prepared["spec"]
    assert "replicas" in decode["spec"], "the plan itself is not modified"


def test_router_replicas_stay_the_operators(make_pool: PoolFactory) -> None:
    router = planned(make_pool())[("Deployment", "tiny-router")]
    assert applying.prepare(router, live_copy(router))["spec"]["replicas"] == 1


def test_digest_ignores_worker_replicas_but_not_the_rest(make_pool: PoolFactory) -> None:
    decode = planned(make_pool())[("Deployment", "tiny-decode")]
    scaled = copy.deepcopy(decode)
    scaled["spec"]["replicas"] = 7
    assert applying.digest(decode) == applying.digest(scaled)
    other = copy.deepcopy(decode)
    other["spec"]["template"]["spec"]["containers"][0]["image"] = "x:1"
    assert applying.digest(decode) != applying.digest(other)


def test_the_applied_hash_rides_along(make_pool: PoolFactory) -> None:
    cm = planned(make_pool())[("ConfigMap", "tiny-router")]
    prepared = applying.prepare(cm, None)
    assert prepared["metadata"]["annotations"][applying.ANNOTATION_APPLIED_HASH] == (
        applying.digest(cm)
    )


def test_drift_reasons(make_pool: PoolFactory) -> None:
    cm = planned(make_pool())[("ConfigMap", "tiny-router")]
    prepared = applying.prepare(cm, None)
    assert applying.drift(prepared, None) == "missing"
    live = live_copy(prepared)
    assert applying.drift(prepared, live) is None

    edited = copy.deepcopy(live)
    edited["data"]["router.json"] = "{}"
    assert applying.drift(prepared, edited) == "drifted"

    stale = copy.deepcopy(live)
    stale["metadata"]["annotations"][applying.ANNOTATION_APPLIED_HASH] = "old"
    assert applying.drift(prepared, stale) == "outdated"


def test_fields_added_by_the_server_or_others_are_no_drift(make_pool: PoolFactory) -> None:
    svc = planned(make_pool())[("Service", "tiny")]
    prepared = applying.prepare(svc, None)
    live = live_copy(prepared)
    live["spec"]["clusterIP"] = "10.96.0.12"
    live["spec"]["ports"][0]["targetPort"] = "http"
    live["metadata"]["labels"]["team"] = "someone-elses-label"
    assert applying.drift(prepared, live) is None


@pytest.mark.parametrize(
    ("want", "have", "expected"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, True),
        ({"a": 1}, {"a": "1"}, True),  # quantities and int-or-string come back as strings
        ({"a": True}, {"a": "True"}, False),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, False),
        ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]}, True),
        ({"a": {"b": 1}}, {"a": None}, False),
        ({"a": 1}, {}, False),
    ],
)
def test_is_subset(want: object, have: object, expected: bool) -> None:
    assert applying.is_subset(want, have) is expected


def test_controller_uid(make_pool: PoolFactory) -> None:
    cm = planned(make_pool())[("ConfigMap", "tiny-router")]
    assert applying.controller_uid(cm) == make_pool().metadata.uid
    assert applying.controller_uid({"metadata": {}}) is None


def _deployment_with_owners(make_pool: PoolFactory, *owners: tuple[str, str]) -> dict[str, object]:
    live = live_copy(planned(make_pool())[("Deployment", "tiny-decode")])
    live["metadata"]["managedFields"] = [
        {"manager": m, "operation": op, "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        for m, op in owners
    ] + [{"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {}}]
    return live


def test_handover_needed_while_the_operator_owns_replicas_alone(make_pool: PoolFactory) -> None:
    live = _deployment_with_owners(make_pool, (applying.FIELD_MANAGER, "Apply"))
    assert applying.needs_replicas_handover(live)
    assert applying.operator_owns_replicas(live)
    body = applying.replicas_handover(live)
    assert body == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tiny-decode", "namespace": "default"},
        "spec": {"replicas": 1},
    }


def test_no_handover_once_shared_or_taken(make_pool: PoolFactory) -> None:
    shared = _deployment_with_owners(
        make_pool, (applying.FIELD_MANAGER, "Apply"), (applying.AUTOSCALER_FIELD_MANAGER, "Apply")
    )
    assert not applying.needs_replicas_handover(shared)
    assert applying.operator_owns_replicas(shared)
    hpa = _deployment_with_owners(make_pool, ("kube-controller-manager", "Update"))
    assert not applying.needs_replicas_handover(hpa)
    assert not applying.operator_owns_replicas(hpa)


def test_no_handover_for_the_router(make_pool: PoolFactory) -> None:
    live = live_copy(planned(make_pool())[("Deployment", "tiny-router")])
    live["metadata"]["managedFields"] = [
        {"manager": applying.FIELD_MANAGER, "operation": "Apply",
         "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    ]  # fmt: skip
    assert not applying.needs_replicas_handover(live)

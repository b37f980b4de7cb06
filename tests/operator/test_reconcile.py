from __future__ import annotations

import copy
from typing import Any

from tandem.operator import applying, kinds, planning, reconcile, validation

from .conftest import PoolFactory, live_copy, planned, pool_body

Live = dict[tuple[str, str], dict[str, Any]]


def _in_sync(pool_plan: dict[tuple[str, str], dict[str, Any]]) -> Live:
    """Live children exactly as a previous reconcile left them (replicas handed over)."""
    live: Live = {}
    for k, obj in pool_plan.items():
        applied = live_copy(applying.prepare(obj, None))
        if applying.is_worker_deployment(applied):
            applied["metadata"]["managedFields"] = [
                {"manager": applying.AUTOSCALER_FIELD_MANAGER, "operation": "Apply",
                 "fieldsV1": {"f:spec": {"f:replicas": {}}}},
            ]  # fmt: skip
        live[k] = applied
    return live


def test_everything_is_created_at_first(make_pool: PoolFactory) -> None:
    pool = make_pool()
    desired = planning.plan(pool)
    decision = reconcile.decide(pool, desired, {})
    assert [a.key for a in decision.applies] == [applying.key(o) for o in desired]
    assert {a.why for a in decision.applies} == {"missing"}
    assert not decision.prunes
    assert not decision.handovers
    decode = next(a.obj for a in decision.applies if a.key == ("Deployment", "tiny-decode"))
    assert decode["spec"]["replicas"] == 1


def test_nothing_to_do_when_in_sync(make_pool: PoolFactory) -> None:
    pool = make_pool()
    decision = reconcile.decide(pool, planning.plan(pool), _in_sync(planned(pool)))
    assert decision.idle
    assert not decision.conflicts


def test_a_scaled_worker_is_no_drift(make_pool: PoolFactory) -> None:
    pool = make_pool()
    live = _in_sync(planned(pool))
    live[("Deployment", "tiny-decode")]["spec"]["replicas"] = 4
    assert reconcile.decide(pool, planning.plan(pool), live).idle


def test_a_hand_edit_is_restored(make_pool: PoolFactory) -> None:
    pool = make_pool()
    live = _in_sync(planned(pool))
    container = live[("Deployment", "tiny-decode")]["spec"]["template"]["spec"]["containers"][0]
    container["image"] = "evil:1"
    decision = reconcile.decide(pool, planning.plan(pool), live)
    assert [(a.key, a.why) for a in decision.applies] == [
        (("Deployment", "tiny-decode"), "drifted")
    ]
    assert "replicas" not in decision.applies[0].obj["spec"]


def test_a_spec_change_updates_only_what_it_touches(make_pool: PoolFactory) -> None:
    before = make_pool()
    live = _in_sync(planned(before))
    after = make_pool(router={"replicas": 3, "policy": "prefix-aware"})
    decision = reconcile.decide(after, planning.plan(after), live)
    assert {a.key for a in decision.applies} == {
        ("Deployment", "tiny-router"),
        ("ConfigMap", "tiny-router"),
    }
    assert {a.why for a in decision.applies} == {"outdated"}


def test_switch_to_aggregated_prunes_the_prefill_pool(make_pool: PoolFactory) -> None:
    live = _in_sync(planned(make_pool()))
    aggregated = make_pool(mode="aggregated")
    decision = reconcile.decide(aggregated, planning.plan(aggregated), live)
    assert {(p.resource.kind, p.name) for p in decision.prunes} == {
        ("Deployment", "tiny-prefill"),
        ("Service", "tiny-prefill"),
        ("PodDisruptionBudget", "tiny-prefill"),
    }
    prune = next(p for p in decision.prunes if p.resource == kinds.DEPLOYMENTS)
    assert prune.uid == live[("Deployment", "tiny-prefill")]["metadata"]["uid"]
    assert prune.namespace == "default"


def test_only_the_pools_own_children_are_pruned(make_pool: PoolFactory) -> None:
    pool = make_pool()
    live = _in_sync(planned(pool))
    stray = live_copy(live[("Service", "tiny-decode")], name="tiny-extra", uid="u-x")
    stray["metadata"]["ownerReferences"] = []  # labelled like ours, but not controlled by us
    live[("Service", "tiny-extra")] = stray
    going = live_copy(live[("Service", "tiny-decode")], name="tiny-going", uid="u-g")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    live[("Service", "tiny-going")] = going
    assert reconcile.decide(pool, planning.plan(pool), live).idle


def test_a_strangers_object_is_not_adopted(make_pool: PoolFactory) -> None:
    pool = make_pool()
    live = _in_sync(planned(pool))
    theirs = live[("Service", "tiny")]
    theirs["metadata"]["ownerReferences"] = []
    decision = reconcile.decide(pool, planning.plan(pool), live)
    assert decision.idle
    [conflict] = decision.conflicts
    assert conflict.reason == "ChildConflict"
    assert "Service default/tiny exists and is not owned by this pool" in conflict.message


def test_a_child_of_a_previous_pool_of_the_same_name_waits(make_pool: PoolFactory) -> None:
    pool = make_pool()
    live = _in_sync(planned(pool))
    old = live[("ConfigMap", "tiny-router")]
    old["metadata"]["ownerReferences"][0]["uid"] = "the-deleted-pool"
    old["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    [conflict] = reconcile.decide(pool, planning.plan(pool), live).conflicts
    assert "is being deleted" in conflict.message


def test_replicas_owned_by_the_operator_alone_are_handed_over_then_released(
    make_pool: PoolFactory,
) -> None:
    pool = make_pool()
    live = _in_sync(planned(pool))
    decode = live[("Deployment", "tiny-decode")]
    decode["metadata"]["managedFields"] = [
        {"manager": applying.FIELD_MANAGER, "operation": "Apply",
         "fieldsV1": {"f:spec": {"f:replicas": {}}}},
    ]  # fmt: skip
    decode["spec"]["replicas"] = 2
    decision = reconcile.decide(pool, planning.plan(pool), live)
    assert [h["spec"] for h in decision.handovers] == [{"replicas": 2}]
    assert [(a.key, a.why) for a in decision.applies] == [
        (("Deployment", "tiny-decode"), "release-replicas")
    ]
    assert "replicas" not in decision.applies[0].obj["spec"]


def test_after_create_hands_over(make_pool: PoolFactory) -> None:
    decode = planned(make_pool())[("Deployment", "tiny-decode")]
    created = live_copy(applying.prepare(decode, None))
    created["metadata"]["managedFields"] = [
        {"manager": applying.FIELD_MANAGER, "operation": "Apply",
         "fieldsV1": {"f:spec": {"f:replicas": {}}}},
    ]  # fmt: skip
    decision = reconcile.after_create(decode, created)
    assert len(decision.handovers) == 1
    assert [a.why for a in decision.applies] == ["release-replicas"]
    router = planned(make_pool())[("Deployment", "tiny-router")]
    assert reconcile.after_create(router, live_copy(router)).idle


# -- status -------------------------------------------------------------------


def test_observation_covers_the_roles_the_pool_runs(make_pool: PoolFactory) -> None:
    pool = make_pool()
    live = _in_sync(planned(pool))
    live[("Deployment", "tiny-decode")]["status"] = {"replicas": 1, "readyReplicas": 1}
    obs = reconcile.observation(pool, live)
    assert set(obs.workloads) == {"prefill", "decode", "router"}
    assert obs.workloads["decode"].ready == 1
    assert obs.endpoint == "http://tiny.default.svc/v1"
    assert obs.generation == 1
    aggregated = make_pool(mode="aggregated")
    assert set(reconcile.observation(aggregated, live).workloads) == {"decode", "router"}


def test_status_object_targets_the_pool() -> None:
    body = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": {}}
    assert reconcile.status_object(body, {"endpoint": "x"}) == {
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "p", "namespace": "ns"},
        "status": {"endpoint": "x"},
    }


# -- child events ---------------------------------------------------------------


def _event(kind: str | None, body: dict[str, Any]) -> reconcile.ChildEvent:
    return reconcile.ChildEvent(kind, body)


def test_owner_pool() -> None:
    child = {"metadata": {"ownerReferences": [
        {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "controller": True},
    ]}}  # fmt: skip
    assert reconcile.owner_pool(child) is None
    child["metadata"]["ownerReferences"].append(
        {"apiVersion": "tandem.dev/v1alpha1", "kind": "InferencePool", "name": "tiny",
         "controller": True}
    )  # fmt: skip
    assert reconcile.owner_pool(child) == "tiny"


def test_child_events_that_need_a_reconcile(make_pool: PoolFactory) -> None:
    pool = make_pool()
    settings = planning.PlanSettings()
    live = _in_sync(planned(pool))
    svc = live[("Service", "tiny-decode")]
    assert reconcile.child_trigger(pool, _event("MODIFIED", svc), settings) is None
    assert reconcile.child_trigger(pool, _event("DELETED", svc), settings) == (
        "Service tiny-decode was deleted"
    )
    edited = copy.deepcopy(svc)
    edited["spec"]["ports"][0]["port"] = 9999
    assert reconcile.child_trigger(pool, _event("MODIFIED", edited), settings) == (
        "Service tiny-decode is drifted"
    )
    aggregated = make_pool(mode="aggregated")
    prefill = live[("Service", "tiny-prefill")]
    assert reconcile.child_trigger(aggregated, _event(None, prefill), settings) == (
        "Service tiny-prefill is no longer planned"
    )


def test_child_events_of_other_owners_are_ignored(make_pool: PoolFactory) -> None:
    pool = make_pool()
    svc = _in_sync(planned(pool))[("Service", "tiny-decode")]
    svc["metadata"]["ownerReferences"][0]["uid"] = "another-pool-of-that-name"
    assert reconcile.child_trigger(pool, _event("DELETED", svc), planning.PlanSettings()) is None


def test_deployment_status_moves_trigger_a_status_refresh(make_pool: PoolFactory) -> None:
    body: dict[str, Any] = {
        "status": {"decode": {"replicas": 1, "readyReplicas": 0, "desiredReplicas": 1}}
    }
    raw = pool_body()
    raw.update(body)
    pool = validation.parse_pool(raw)
    decode = _in_sync(planned(pool))[("Deployment", "tiny-decode")]
    decode["status"] = {"replicas": 1, "readyReplicas": 0}
    settings = planning.PlanSettings()
    assert reconcile.child_trigger(pool, _event("MODIFIED", decode), settings) is None
    decode["status"]["readyReplicas"] = 1
    assert reconcile.child_trigger(pool, _event("MODIFIED", decode), settings) == (
        "Deployment tiny-decode status changed"
    )

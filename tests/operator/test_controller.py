"""The controller's I/O choreography, against the in-memory API of conftest."""

from __future__ import annotations

import datetime
import logging

from tandem.operator import applying, client, controller, kinds, planning

from .conftest import FakeKube, pool_body

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LOG = logging.getLogger("test")


def make(fake: FakeKube) -> controller.Controller:
    return controller.Controller(fake, planning.PlanSettings(), clock=lambda: T0)  # type: ignore[arg-type]


def stored_pool(fake: FakeKube, **spec: object) -> dict[str, object]:
    return fake.put(pool_body(**spec))


async def test_first_reconcile_creates_everything_and_hands_replicas_over(
    fake_kube: FakeKube,
) -> None:
    body = stored_pool(fake_kube)
    report = await make(fake_kube).reconcile(body, LOG)
    assert not report.problems
    kinds_created = sorted(n.message for n in report.notices if n.reason == "Created")
    assert len(kinds_created) == 13
    decode = fake_kube.objects[("deployments", "default", "tiny-decode")]
    assert decode["spec"]["replicas"] == 1
    owners = [e["manager"] for e in decode["metadata"]["managedFields"]]
    assert owners == [applying.AUTOSCALER_FIELD_MANAGER]
    pool = fake_kube.objects[("inferencepools", "default", "tiny")]
    assert pool["status"]["observedGeneration"] == 1
    assert pool["status"]["decode"]["summary"] == "0/1"
    assert pool["status"]["endpoint"] == "http://tiny.default.svc/v1"
    assert report.status_written


async def test_second_reconcile_writes_nothing(fake_kube: FakeKube) -> None:
    ctl = make(fake_kube)
    await ctl.reconcile(stored_pool(fake_kube), LOG)
    fake_kube.writes.clear()
    body = fake_kube.objects[("inferencepools", "default", "tiny")]
    report = await ctl.reconcile(body, LOG)
    assert fake_kube.writes == []
    assert report.notices == []
    assert not report.status_written


async def test_autoscaled_replicas_survive_a_spec_change(fake_kube: FakeKube) -> None:
    ctl = make(fake_kube)
    await ctl.reconcile(stored_pool(fake_kube), LOG)
    decode = fake_kube.objects[("deployments", "default", "tiny-decode")]
    decode["spec"]["replicas"] = 2  # the autoscaler did this
    changed = fake_kube.put(
        pool_body(engine={"image": "vllm/vllm-openai:v9", "kvBufferDevice": "cpu"})
    )
    report = await ctl.reconcile(changed, LOG)
    assert not report.problems
    decode = fake_kube.objects[("deployments", "default", "tiny-decode")]
    assert decode["spec"]["replicas"] == 2
    assert decode["spec"]["template"]["spec"]["containers"][0]["image"] == "vllm/vllm-openai:v9"
    assert ("Updated", "Updated Deployment tiny-decode") in {
        (n.reason, n.message) for n in report.notices
    }


async def test_mode_switch_prunes(fake_kube: FakeKube) -> None:
    ctl = make(fake_kube)
    await ctl.reconcile(stored_pool(fake_kube), LOG)
    report = await ctl.reconcile(fake_kube.put(pool_body(mode="aggregated")), LOG)
    assert ("deployments", "default", "tiny-prefill") not in fake_kube.objects
    assert ("services", "default", "tiny-prefill") not in fake_kube.objects
    deleted = {n.message for n in report.notices if n.reason == "Deleted"}
    assert "Deleted Deployment tiny-prefill (no longer in the plan)" in deleted
    status = fake_kube.objects[("inferencepools", "default", "tiny")]["status"]
    assert status["prefill"]["summary"] == "-"


async def test_a_strangers_object_is_reported_not_taken(fake_kube: FakeKube) -> None:
    fake_kube.put({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "tiny", "namespace": "default"}, "spec": {}})  # fmt: skip
    report = await make(fake_kube).reconcile(stored_pool(fake_kube), LOG)
    assert [p.reason for p in report.problems] == ["ChildConflict"]
    assert fake_kube.objects[("services", "default", "tiny")]["spec"] == {}
    status = fake_kube.objects[("inferencepools", "default", "tiny")]["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ChildConflict")


async def test_apply_failures_are_reported_and_retried(fake_kube: FakeKube) -> None:
    fake_kube.fail_apply["tiny-router"] = client.ApiError(503, "ServiceUnavailable", "busy")
    report = await make(fake_kube).reconcile(stored_pool(fake_kube), LOG)
    assert report.retry
    assert {p.reason for p in report.problems} == {"ApplyFailed"}
    assert ("deployments", "default", "tiny-decode") in fake_kube.objects


async def test_an_invalid_spec_is_reported(fake_kube: FakeKube) -> None:
    body = pool_body()
    body["spec"]["mode"] = "sideways"
    body = fake_kube.put(body)
    report = await make(fake_kube).reconcile(body, LOG)
    assert [p.reason for p in report.problems] == ["InvalidSpec"]
    assert "spec.mode" in report.problems[0].message
    assert [k for k in fake_kube.objects if k[0] != "inferencepools"] == []


async def test_reconcile_named_skips_pools_that_are_gone(fake_kube: FakeKube) -> None:
    ctl = make(fake_kube)
    assert await ctl.reconcile_named("default", "tiny", LOG) is None
    body = pool_body()
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    fake_kube.put(body)
    assert await ctl.reconcile_named("default", "tiny", LOG) is None


async def test_a_deleted_child_is_recreated(fake_kube: FakeKube) -> None:
    ctl = make(fake_kube)
    await ctl.reconcile(stored_pool(fake_kube), LOG)
    await fake_kube.delete(kinds.SERVICES, "default", "tiny-decode")
    result = await ctl.reconcile_named("default", "tiny", LOG)
    assert result is not None
    assert ("services", "default", "tiny-decode") in fake_kube.objects
    assert [n.message for n in result[1].notices] == ["Created Service tiny-decode"]


async def test_a_terminating_namespace_is_no_problem(fake_kube: FakeKube) -> None:
    fake_kube.fail_apply["tiny-router"] = client.ForbiddenError(
        403,
        "Forbidden",
        "unable to create new content in namespace x because it is being terminated",
    )
    report = await make(fake_kube).reconcile(stored_pool(fake_kube), LOG)
    assert not report.problems
    assert not report.retry


async def test_a_failed_handover_keeps_the_replicas(fake_kube: FakeKube) -> None:
    ctl = make(fake_kube)
    await ctl.reconcile(stored_pool(fake_kube), LOG)
    decode = fake_kube.objects[("deployments", "default", "tiny-decode")]
    decode["spec"]["replicas"] = 3
    decode["metadata"]["managedFields"] = [
        {"manager": applying.FIELD_MANAGER, "operation": "Apply",
         "fieldsV1": {"f:spec": {"f:replicas": {}}}},
    ]  # fmt: skip
    fake_kube.fail_apply["tiny-decode"] = client.ApiError(500, "InternalError", "boom")
    body = fake_kube.objects[("inferencepools", "default", "tiny")]
    report = await ctl.reconcile(body, LOG)
    assert report.retry
    assert fake_kube.objects[("deployments", "default", "tiny-decode")]["spec"]["replicas"] == 3
    del fake_kube.fail_apply["tiny-decode"]
    await ctl.reconcile(body, LOG)
    decode = fake_kube.objects[("deployments", "default", "tiny-decode")]
    assert decode["spec"]["replicas"] == 3
    assert [e["manager"] for e in decode["metadata"]["managedFields"]] == [
        applying.AUTOSCALER_FIELD_MANAGER
    ]

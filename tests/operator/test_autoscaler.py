"""The autoscaler's shell: Deployments and status in an in-memory API, readings from a fake.

(The same against a real API server and a real Prometheus: e2e/autoscaling.)
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

import kopf
import pytest

from tandem.autoscaling import planner, prometheus, signals
from tandem.operator import (
    autoscaler,
    cli,
    client,
    controller,
    handlers,
    kinds,
    planning,
    validation,
)
from tandem.operator.settings import OperatorSettings

from .conftest import FakeKube, pool_body

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
HOT = planner.RoleMetrics(ttft=3.0, queue_depth=1)  # tiny.yaml: TTFT objective 2s
CALM_P = planner.RoleMetrics(ttft=0.2)
CALM_D = planner.RoleMetrics(tpot=0.05, kv_usage=0.3)
DOWN = planner.MetricsUnavailable(
    "Prometheus unreachable at http://p:9090: refused", "PrometheusUnreachable"
)


class FakeSource:
    """Readings set by the test, per role."""

    def __init__(self) -> None:
        self.forgotten: list[tuple[str | None, str]] = []
        self.metrics: dict[str, planner.RoleMetrics | planner.MetricsUnavailable] = {
            "prefill": CALM_P,
            "decode": CALM_D,
        }
        self.calls: list[dict[str, Any]] = []
        self.slo = signals.PoolAttainment()
        """What the pool's routers report (on the decode reading)."""

    def forget(self, namespace: str | None, pool: str) -> None:
        self.forgotten.append((namespace, pool))

    async def read_pool(
        self,
        spec: planner.PlannerSpec,
        pool: str,
        roles: tuple[planner.Role, ...],
        *,
        window: float,
        warmup: float,
        namespace: str | None = None,
    ) -> dict[planner.Role, signals.Reading]:
        self.calls.append({"pool": pool, "roles": roles, "window": window, "namespace": namespace})
        out = {r: _reading(r, self.metrics[r]) for r in roles}
        decode = out["decode"].snapshot
        if decode is not None:
            out["decode"] = signals.Reading("decode", dataclasses.replace(
                decode, attainment_requests=self.slo.requests, attainment_ttft=self.slo.ttft,
                attainment_tpot=self.slo.tpot, attainment_both=self.slo.both,
            ))  # fmt: skip
        return out


def _reading(
    role: planner.Role, m: planner.RoleMetrics | planner.MetricsUnavailable
) -> signals.Reading:
    """What Prometheus would answer for one warm worker showing ``m``."""
    if isinstance(m, planner.MetricsUnavailable):
        return signals.Reading(role, None, m.reason, m.cause)
    snapshot = signals.Snapshot(
        targets=1, warm=1, engine_waiting=m.queue_depth, ttft=m.ttft, tpot=m.tpot,
        kv_usage=m.kv_usage, request_rate=m.request_rate, prompt_token_rate=m.prompt_token_rate,
    )  # fmt: skip
    return signals.Reading(role, snapshot)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


def setup(fake: FakeKube, **spec: Any) -> dict[str, Any]:
    """A pool with its worker Deployments (each ready at its size), stored in ``fake``."""
    body = pool_body(**spec)
    fake.put(body)
    pool = validation.parse_pool(body)
    for obj in planning.plan(pool):
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] != "tiny-router":
            stored = fake.put(obj)
            stored["status"] = {"readyReplicas": stored["spec"]["replicas"]}
    return body


def stored(fake: FakeKube, plural: str, name: str) -> dict[str, Any]:
    return fake.objects[(plural, "default", name)]


def replicas(fake: FakeKube, name: str) -> int:
    return int(stored(fake, "deployments", name)["spec"]["replicas"])


def condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    return next(c for c in status.get("conditions", []) if c["type"] == kind)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def scaler(fake_kube: FakeKube, source: FakeSource, clock: Clock) -> autoscaler.Autoscaler:
    return autoscaler.Autoscaler(fake_kube, source, clock=clock)


async def ticks(
    scaler: autoscaler.Autoscaler, fake: FakeKube, clock: Clock, seconds: float
) -> list[autoscaler.Tick]:
    """Tick every 5 s (tiny.yaml's interval) for ``seconds``, the pool read fresh each
    time; new workers are ready at once."""
    out = []
    for _ in range(int(seconds // 5) + 1):
        out.append(await scaler.tick(stored(fake, "inferencepools", "tiny")))
        for name in ("tiny-prefill", "tiny-decode"):
            dep = stored(fake, "deployments", name)
            dep["status"] = {"readyReplicas": dep["spec"]["replicas"]}
        clock.advance(5)
    return out


async def test_prefill_scales_up_after_the_stabilization_window(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube)
    source.metrics["prefill"] = HOT
    done = await ticks(scaler, fake_kube, clock, 25)
    assert replicas(fake_kube, "tiny-prefill") == 1  # pressure has not lasted 30 s yet
    assert not any(n.reason == "ScaledUp" for t in done for n in t.notices)
    [tick] = await ticks(scaler, fake_kube, clock, 0)
    assert replicas(fake_kube, "tiny-prefill") == 2
    assert replicas(fake_kube, "tiny-decode") == 1
    assert ("tandem-autoscaler", "Deployment", "tiny-prefill") in fake_kube.writes
    [event] = [n for n in tick.notices if n.reason == "ScaledUp"]
    assert event.message == "prefill 1→2: TTFT p90 3s > 2s"
    assert tick.interval == 5
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    last = status["prefill"]["lastDecision"]
    assert (last["fromReplicas"], last["toReplicas"]) == (1, 2)
    assert last["time"] == "2025-01-01T00:00:30Z"
    assert last["reason"] == event.message.split(": ", 1)[1]
    assert status["observed"] == {"ttft": "3s", "ttftSeconds": 3.0, "tpot": "50ms",
                                  "tpotSeconds": 0.05, "queueDepth": 1.0}  # fmt: skip
    assert condition(status, "MetricsAvailable")["status"] == "True"
    # tiny.yaml: prefill max 2; more pressure is ScalingLimited at max.
    later = await ticks(scaler, fake_kube, clock, 60)
    assert replicas(fake_kube, "tiny-prefill") == 2
    assert all(n.reason != "ScaledUp" for t in later for n in t.notices)


async def test_a_scale_up_is_limited_by_replicas_max(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube)
    source.metrics["decode"] = planner.RoleMetrics(tpot=1.0, kv_usage=0.99)
    await ticks(scaler, fake_kube, clock, 30)
    assert replicas(fake_kube, "tiny-decode") == 2
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    limited = condition(status, "ScalingLimited")
    assert (limited["status"], limited["reason"]) == ("True", "AtMaxReplicas")
    assert "decode 1→2" in limited["message"]


async def test_metrics_unavailable_holds_and_says_why_once(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube)
    stored(fake_kube, "deployments", "tiny-decode")["spec"]["replicas"] = 2
    source.metrics = {"prefill": DOWN, "decode": DOWN}
    done = await ticks(scaler, fake_kube, clock, 600)
    assert replicas(fake_kube, "tiny-decode") == 2  # never collapses to min
    assert not [w for w in fake_kube.writes if w[1] == "Deployment"]
    warnings = [n for t in done for n in t.notices if n.type == "Warning"]
    assert len(warnings) == 1
    assert warnings[0].reason == "PrometheusUnreachable"
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    available = condition(status, "MetricsAvailable")
    assert (available["status"], available["reason"]) == ("False", "PrometheusUnreachable")
    assert "holding the current replicas" in available["message"]
    assert available["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    assert "observed" not in status


async def test_policy_external_never_writes_replicas(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube, autoscaling={"policy": "external", "interval": "5s"})
    source.metrics["prefill"] = HOT
    await ticks(scaler, fake_kube, clock, 120)
    assert not [w for w in fake_kube.writes if w[1] == "Deployment"]
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    assert condition(status, "MetricsAvailable")["status"] == "True"


async def test_without_prometheus_the_pool_says_so_once(fake_kube: FakeKube, clock: Clock) -> None:
    setup(fake_kube)
    scaler = autoscaler.Autoscaler(fake_kube, None, clock=clock)
    first = await scaler.tick(stored(fake_kube, "inferencepools", "tiny"))
    assert first.done
    assert first.status_written
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    assert condition(status, "MetricsAvailable")["reason"] == "AutoscalerDisabled"
    again = await scaler.tick(stored(fake_kube, "inferencepools", "tiny"))
    assert again.done
    assert not again.status_written
    assert not [w for w in fake_kube.writes if w[1] == "Deployment"]


async def test_a_failed_scale_is_not_recorded(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube)
    source.metrics["prefill"] = HOT
    fake_kube.fail_apply["tiny-prefill"] = client.ForbiddenError(403, "Forbidden", "no")
    done = await ticks(scaler, fake_kube, clock, 30)
    assert [n.reason for n in done[-1].notices] == ["ScaleFailed"]
    assert "lastDecision" not in stored(fake_kube, "inferencepools", "tiny")["status"].get(
        "prefill", {}
    )
    del fake_kube.fail_apply["tiny-prefill"]
    [tick] = await ticks(scaler, fake_kube, clock, 0)  # no cooldown from the failed one
    assert replicas(fake_kube, "tiny-prefill") == 2
    assert [n.reason for n in tick.notices] == ["ScaledUp"]


async def test_the_status_keeps_the_last_decisions(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube)
    source.metrics["prefill"] = HOT
    await ticks(scaler, fake_kube, clock, 30)
    source.metrics["prefill"] = CALM_P
    await ticks(scaler, fake_kube, clock, 10)
    # Every write sends the last decision again: under server-side apply, a field the
    # manager leaves out would be removed.
    last = stored(fake_kube, "inferencepools", "tiny")["status"]["prefill"]["lastDecision"]
    assert last["toReplicas"] == 2


def test_restore_takes_the_scale_times_from_the_status() -> None:
    state = autoscaler.restore(
        {
            "prefill": {
                "lastDecision": {
                    "time": "2025-01-01T00:00:30Z",
                    "fromReplicas": 1,
                    "toReplicas": 3,
                    "reason": "x",
                }
            },
            "decode": {
                "lastDecision": {
                    "time": "2025-01-01T00:01:00Z",
                    "fromReplicas": 3,
                    "toReplicas": 2,
                    "reason": "y",
                }
            },
        }
    )
    assert state.prefill.last_scale_up == T0.timestamp() + 30
    assert state.prefill.last_scale_down is None
    assert state.decode.last_scale_down == T0.timestamp() + 60
    assert state.decode.history == ()
    assert autoscaler.restore({}) == planner.PlannerState()
    assert autoscaler.restore({"decode": {"lastDecision": {"time": "garbage"}}}) == (
        planner.PlannerState()
    )


async def test_a_restarted_autoscaler_needs_fresh_evidence(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube, prefill={"replicas": {"min": 1, "max": 8}})
    source.metrics["prefill"] = planner.RoleMetrics(ttft=4.8)  # ratio 2.4
    await ticks(scaler, fake_kube, clock, 30)
    assert replicas(fake_kube, "tiny-prefill") == 3
    successor = autoscaler.Autoscaler(fake_kube, source, clock=clock)
    await ticks(successor, fake_kube, clock, 25)
    assert replicas(fake_kube, "tiny-prefill") == 3  # no history: the window starts again
    await ticks(successor, fake_kube, clock, 10)
    assert replicas(fake_kube, "tiny-prefill") == 5  # one step of at most 2


@pytest.mark.parametrize(
    "cause", ["PrometheusUnreachable", "QueryFailed", "NoTargets", "MetricsMissing"]
)
def test_the_metrics_reason_is_carried_not_parsed(cause: planner.Cause) -> None:
    # A message that reads like another cause (or like none) changes nothing.
    reworded = planner.MetricsUnavailable("Prometheus unreachable, or not exposed?", cause)
    readings = {"decode": _reading("decode", reworded)}
    plan = planner.decide(
        planner.PlannerSpec(),
        planner.Inputs(decode=readings["decode"].inputs(1, 1)),
        planner.PlannerState(),
        0.0,
    )
    wanted = autoscaler.status(plan, readings, 3, {}, "2025-01-01T00:00:00Z")
    available = condition(wanted, "MetricsAvailable")
    assert (available["status"], available["reason"]) == ("False", cause)
    assert available["message"] == (
        "decode: Prometheus unreachable, or not exposed?; holding the current replicas"
    )


SLO = {"ttft": "500ms", "tpot": "50ms", "percentile": 90}


async def test_the_status_says_how_many_requests_met_the_slo(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube, slo=SLO)
    source.slo = signals.PoolAttainment(1204, ttft=0.97, tpot=0.95123, both=0.9312)
    await ticks(scaler, fake_kube, clock, 0)
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    assert status["slo"] == {
        "attainment": {"ttft": 0.97, "tpot": 0.9512, "both": 0.9312},
        "requests": 1204,
        "window": "5m",
        "summary": "93.1%",
    }
    attained = condition(status, "SLOAttained")
    assert (attained["status"], attained["reason"]) == ("True", "AtObjective")
    assert attained["message"] == (
        "93.1% of the last 5m's 1,204 requests met both objectives (TTFT ≤ 500ms, "
        "TPOT ≤ 50ms), at the p90 objective"
    )
    assert attained["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    assert ("tandem-autoscaler", "InferencePool", "tiny") in fake_kube.writes

    source.slo = signals.PoolAttainment(1204, ttft=0.95, tpot=0.95, both=0.8999)
    await ticks(scaler, fake_kube, clock, 0)
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    below = condition(status, "SLOAttained")
    assert (below["status"], below["reason"]) == ("False", "BelowObjective")
    assert below["message"] == (
        "89.9% of the last 5m's 1,204 requests met both objectives (TTFT ≤ 500ms, "
        "TPOT ≤ 50ms), under the p90 objective"
    )
    assert below["lastTransitionTime"] == "2025-01-01T00:00:05Z"
    assert status["slo"]["summary"] == "89.9%"  # rounded down: never 90.0% below p90


async def test_no_traffic_and_no_router_leave_the_slo_unknown(
    fake_kube: FakeKube, source: FakeSource, clock: Clock, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube, slo={**SLO, "attainmentWindow": "120s"})
    source.slo = signals.PoolAttainment(0)
    await ticks(scaler, fake_kube, clock, 5)
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    assert status["slo"] == {"requests": 0, "window": "2m"}
    idle = condition(status, "SLOAttained")
    assert (idle["status"], idle["reason"]) == ("Unknown", "NoTraffic")
    assert idle["message"] == "no request finished in the last 2m"
    assert idle["lastTransitionTime"] == "2025-01-01T00:00:00Z"  # held while Unknown
    source.slo = signals.PoolAttainment()  # no router reports it
    await ticks(scaler, fake_kube, clock, 0)
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    unmeasured = condition(status, "SLOAttained")
    assert (unmeasured["status"], unmeasured["reason"]) == ("Unknown", "NotMeasured")
    source.metrics["decode"] = DOWN  # nor when the decode signals are unavailable
    await ticks(scaler, fake_kube, clock, 0)
    status = stored(fake_kube, "inferencepools", "tiny")["status"]
    assert condition(status, "SLOAttained")["reason"] == "NotMeasured"


def test_the_slo_status_is_carried_as_read() -> None:
    readings = {"decode": signals.Reading("decode", signals.Snapshot(
        targets=1, warm=1, attainment_requests=10, attainment_ttft=1.0, attainment_both=1.0,
    ))}  # fmt: skip
    objective = validation.parse_pool(pool_body(slo=SLO)).spec.slo
    slo, attained = autoscaler.slo_status(readings, objective, 2, {}, "2025-01-01T00:00:00Z")
    assert slo == autoscaler.api.SloStatus(
        attainment=autoscaler.api.SloAttainment(ttft=1.0, both=1.0),
        requests=10,
        window="5m",
        summary="100.0%",
    )
    assert (attained.status, attained.observed_generation) == ("True", 2)
    # No router reports: no status.slo is sent, so server-side apply removes the old one.
    unread = {"decode": signals.Reading("decode", signals.Snapshot(targets=1, warm=1))}
    slo, attained = autoscaler.slo_status(unread, objective, 2, {}, "2025-01-01T00:00:00Z")
    assert (slo, attained.status, attained.reason) == (None, "Unknown", "NotMeasured")
    plan = planner.decide(
        planner.PlannerSpec(),
        planner.Inputs(decode=unread["decode"].inputs(1, 1)),
        planner.PlannerState(),
        0.0,
    )
    wanted = autoscaler.status(plan, unread, 2, {"slo": {"requests": 0}}, "t", objective)
    assert "slo" not in wanted
    assert condition(wanted, "SLOAttained")["reason"] == "NotMeasured"


class Stopped:
    """kopf's daemon flag, stopping after ``ticks`` waits."""

    def __init__(self, ticks: int) -> None:
        self.left = ticks
        self.waited: list[float | None] = []

    def __bool__(self) -> bool:
        return self.left <= 0

    async def _wait(self) -> None:
        self.left -= 1

    def wait(self, timeout: float | None = None) -> Any:
        self.waited.append(timeout)
        return self._wait()


async def test_the_daemon_ticks_every_interval_until_stopped(
    fake_kube: FakeKube, source: FakeSource, scaler: autoscaler.Autoscaler
) -> None:
    setup(fake_kube)
    body = stored(fake_kube, "inferencepools", "tiny")
    stopped = Stopped(3)
    posted: list[controller.Notice] = []
    times = iter(range(100))
    await scaler.run(body, stopped, posted.extend, monotonic=lambda: float(next(times)))
    assert len(source.calls) == 3
    assert stopped.waited == [4.0, 4.0, 4.0]  # interval 5 s less the 1 s a tick took
    assert source.calls[0] == {"pool": "tiny", "roles": ("prefill", "decode"), "window": 60.0,
                               "namespace": "default"}  # fmt: skip


async def test_the_daemon_of_a_disabled_autoscaler_stops_after_saying_so(
    fake_kube: FakeKube,
) -> None:
    setup(fake_kube)
    scaler = autoscaler.Autoscaler(fake_kube, None)
    stopped = Stopped(100)
    await scaler.run(stored(fake_kube, "inferencepools", "tiny"), stopped, lambda _: None)
    assert stopped.waited == []


def test_the_daemon_is_registered_with_a_pinned_id() -> None:
    registry = kopf.OperatorRegistry()
    ctl = controller.Controller(None, planning.PlanSettings())  # type: ignore[arg-type]
    scaler = autoscaler.Autoscaler(None, None)  # type: ignore[arg-type]
    creds = client.Credentials(server="https://x")
    handlers.register(registry, ctl, OperatorSettings(), creds, scaler)
    assert {h.id for h in registry._spawning.get_all_handlers()} == {"resync", "autoscale"}


def test_cli_prometheus_flags() -> None:
    parser = cli.build_parser()
    default = cli.autoscaler_settings_from(parser.parse_args([]))
    assert (default.enabled, default.kind) == (True, "embedded")  # on with no Prometheus
    off = cli.autoscaler_settings_from(parser.parse_args(["--metrics-source=off"]))
    assert (off.enabled, off.source()) == (False, None)
    with pytest.raises(ValueError, match="needs --prometheus-url"):
        cli.autoscaler_settings_from(parser.parse_args(["--metrics-source=prometheus"]))
    on = cli.autoscaler_settings_from(
        parser.parse_args(["--prometheus-url=http://prom:9090/", "--prometheus-timeout=2"])
    )
    source = on.source()
    assert isinstance(source, prometheus.Source)
    assert (source.settings.url, source.settings.timeout) == ("http://prom:9090", 2.0)
    with pytest.raises(ValueError, match="http"):
        cli.autoscaler_settings_from(parser.parse_args(["--prometheus-url=prom:9090"]))


def test_the_rbac_already_covers_the_autoscaler() -> None:
    rules = {(r["apiGroups"][0], r["resources"][0]): r["verbs"]
             for r in kinds.operator_cluster_rules()}  # fmt: skip
    assert "patch" in rules[("apps", "deployments")]  # replicas, by server-side apply
    assert "get" in rules[("apps", "deployments")]
    assert rules[("tandem.dev", "inferencepools/status")] == ["patch"]
    assert rules[("", "events")] == ["create"]

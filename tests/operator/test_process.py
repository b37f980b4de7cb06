"""The operator process's pieces: CLI, kopf settings and handlers, health, RBAC table."""

from __future__ import annotations

import asyncio
import logging

import kopf
import pytest

from tandem import cli as tandem_cli
from tandem.operator import cli, client, controller, handlers, health, kinds, planning
from tandem.operator.settings import OperatorSettings

from .conftest import EXAMPLES, PoolFactory


def test_defaults() -> None:
    settings = cli.settings_from(cli.build_parser().parse_args([]))
    assert settings == OperatorSettings()
    assert settings.leader_election.enabled


def test_flags() -> None:
    args = cli.build_parser().parse_args(
        ["--namespace", "a", "--namespace", "b", "--no-leader-elect", "--resync-interval", "5",
         "--router-image", "r:1", "--health-port", "0", "--lease-namespace", "ops"]
    )  # fmt: skip
    settings = cli.settings_from(args)
    assert settings.namespaces == ("a", "b")
    assert not settings.leader_election.enabled
    assert settings.leader_election.lease_namespace == "ops"
    assert settings.resync_interval == 5
    assert settings.plan.router_image == "r:1"
    assert settings.health_port == 0


@pytest.mark.parametrize(
    "argv",
    [["--resync-interval", "0"], ["--renew-deadline", "20"], ["--retry-period", "0"]],
)
def test_bad_flags(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=r"--"):
        cli.settings_from(cli.build_parser().parse_args(argv))


def test_tandem_operator_reaches_this_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        tandem_cli.main(["operator", "--kubeconfig", "x", "--help"])
    assert exited.value.code == 0
    assert "--leader-elect" in capsys.readouterr().out


def test_kopf_settings() -> None:
    s = handlers.kopf_settings(OperatorSettings(), "me")
    assert s.peering.standalone
    assert s.scanning.disabled
    assert s.posting.level == logging.WARNING
    assert s.posting.reporting_component == "tandem-operator"
    assert isinstance(s.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(s.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)


def test_connection_info_splits_the_header() -> None:
    creds = client.Credentials(server="https://x", authorization=lambda: "Bearer abc",
                               ca_path="/ca", namespace="ns")  # fmt: skip
    info = handlers.connection_info(creds)
    assert (info.scheme, info.token, info.ca_path, info.default_namespace) == (
        "Bearer", "abc", "/ca", "ns",
    )  # fmt: skip
    bare = handlers.connection_info(client.Credentials(server="https://x"))
    assert (bare.scheme, bare.token) == (None, None)


def test_handlers_are_registered_with_pinned_ids() -> None:
    registry = kopf.OperatorRegistry()
    ctl = controller.Controller(None, planning.PlanSettings())  # type: ignore[arg-type]
    handlers.register(registry, ctl, OperatorSettings(), client.Credentials(server="https://x"))
    ids = {h.id for h in registry._changing.get_all_handlers()}
    assert ids == {"reconcile", "forget"}
    assert {h.id for h in registry._spawning.get_all_handlers()} == {"resync"}
    assert {h.id for h in registry._indexing.get_all_handlers()} == {"pools"}
    watched = {h.id for h in registry._watching.get_all_handlers()}
    assert watched == {f"child-{r.plural}" for r in kinds.CHILDREN}


def test_every_planned_kind_is_a_known_child(make_pool: PoolFactory) -> None:
    for example in sorted(EXAMPLES.glob("*.yaml")):
        for mode in ("disaggregated", "aggregated", "auto"):
            for obj in planning.plan(make_pool(example.name, mode=mode)):
                assert kinds.of(obj) in kinds.CHILDREN


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        kinds.of({"apiVersion": "v1", "kind": "Secret"})


def test_rbac_rules_cover_every_child_and_nothing_else() -> None:
    rules = kinds.operator_cluster_rules()
    resources = {(r["apiGroups"][0], r["resources"][0]): r["verbs"] for r in rules}
    for child in kinds.CHILDREN:
        assert resources[(child.group, child.plural)] == sorted(kinds.CHILD_VERBS)
    assert resources[("tandem.dev", "inferencepools/status")] == ["patch"]
    assert resources[("", "events")] == ["create"]
    assert len(rules) == len(kinds.CHILDREN) + 4
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules)


@pytest.mark.parametrize(
    ("line", "code"),
    [("GET /healthz HTTP/1.1", 200), ("GET /readyz HTTP/1.1", 503), ("GET /x HTTP/1.1", 404)],
)
def test_health_answers(line: str, code: int) -> None:
    response = health.answer(line, live=lambda: True, ready=lambda: False)
    assert response.startswith(f"HTTP/1.1 {code} ".encode())


async def test_health_server() -> None:
    server = health.HealthServer("127.0.0.1", 0, live=lambda: True, ready=lambda: True)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    finally:
        await server.stop()
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"ok\n")

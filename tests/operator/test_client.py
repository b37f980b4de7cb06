from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from tandem.operator import client, kinds

Handler = Callable[[httpx.Request], httpx.Response]


def kube(handler: Handler, seen: list[httpx.Request] | None = None) -> client.Kube:
    def record(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return handler(request)

    creds = client.Credentials(server="https://k8s.test", authorization=lambda: "Bearer t0k")
    http = httpx.AsyncClient(
        base_url=creds.server,
        transport=httpx.MockTransport(record),
        auth=client._Auth(creds.authorization),
    )
    return client.Kube(http)


async def test_apply_is_a_server_side_apply_patch() -> None:
    seen: list[httpx.Request] = []
    obj = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "c", "namespace": "ns"}, "data": {"a": "b"}}  # fmt: skip
    k = kube(lambda r: httpx.Response(200, json={**obj, "metadata": {"name": "c"}}), seen)
    result = await k.apply(obj, field_manager="tandem-operator", force=True)
    [request] = seen
    assert request.method == "PATCH"
    assert request.url.path == "/api/v1/namespaces/ns/configmaps/c"
    assert dict(request.url.params) == {"fieldManager": "tandem-operator", "force": "true"}
    assert request.headers["Content-Type"] == "application/apply-patch+yaml"
    assert request.headers["Authorization"] == "Bearer t0k"
    assert json.loads(request.content) == obj
    assert result["kind"] == "ConfigMap"


async def test_apply_to_the_status_subresource() -> None:
    seen: list[httpx.Request] = []
    k = kube(lambda r: httpx.Response(200, json={"metadata": {}}), seen)
    pool = {"apiVersion": "tandem.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "p", "namespace": "ns"}, "status": {}}  # fmt: skip
    await k.apply(pool, field_manager="m", subresource="status")
    assert seen[0].url.path == "/apis/tandem.dev/v1alpha1/namespaces/ns/inferencepools/p/status"
    assert "force" not in seen[0].url.params


async def test_list_follows_continue_and_stamps_items() -> None:
    pages = {
        "": {"metadata": {"continue": "next"}, "items": [{"metadata": {"name": "a"}}]},
        "next": {"metadata": {}, "items": [{"metadata": {"name": "b"}}]},
    }
    seen: list[httpx.Request] = []
    k = kube(lambda r: httpx.Response(200, json=pages[r.url.params.get("continue", "")]), seen)
    items = await k.list(kinds.DEPLOYMENTS, "ns", label_selector="tandem.dev/pool=p")
    assert [i["metadata"]["name"] for i in items] == ["a", "b"]
    assert {(i["apiVersion"], i["kind"]) for i in items} == {("apps/v1", "Deployment")}
    assert seen[0].url.params["labelSelector"] == "tandem.dev/pool=p"


@pytest.mark.parametrize(
    ("status", "error", "temporary"),
    [
        (404, client.NotFoundError, False),
        (409, client.ConflictError, True),
        (403, client.ForbiddenError, False),
        (422, client.InvalidError, False),
        (500, client.ApiError, True),
        (429, client.ApiError, True),
    ],
)
async def test_errors_are_mapped(
    status: int, error: type[client.ApiError], temporary: bool
) -> None:
    body = {"kind": "Status", "message": 'deployments.apps "x" is forbidden', "reason": "R"}
    k = kube(lambda r: httpx.Response(status, json=body))
    with pytest.raises(error) as caught:
        await k.get(kinds.DEPLOYMENTS, "ns", "x")
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.temporary is temporary
    assert "is forbidden" in str(caught.value)


async def test_network_errors_are_api_errors() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(client.ApiError) as caught:
        await kube(fail).get(kinds.DEPLOYMENTS, "ns", "x")
    assert caught.value.status == 0
    assert caught.value.temporary


async def test_find_and_delete_tolerate_absence() -> None:
    k = kube(lambda r: httpx.Response(404, json={"message": "not found"}))
    assert await k.find(kinds.SERVICES, "ns", "x") is None
    assert await k.delete(kinds.SERVICES, "ns", "x") is False


async def test_delete_with_uid_precondition() -> None:
    seen: list[httpx.Request] = []
    k = kube(lambda r: httpx.Response(200, json={"kind": "Status"}), seen)
    assert await k.delete(kinds.SERVICES, "ns", "x", uid="u1") is True
    body = json.loads(seen[0].content)
    assert body["preconditions"] == {"uid": "u1"}
    assert body["propagationPolicy"] == "Background"
    gone = kube(lambda r: httpx.Response(409, json={"message": "uid mismatch"}))
    assert await gone.delete(kinds.SERVICES, "ns", "x", uid="u1") is False


async def test_served() -> None:
    found = {"resources": [{"name": "inferencepools"}, {"name": "inferencepools/status"}]}
    assert await kube(lambda r: httpx.Response(200, json=found)).served(
        "tandem.dev", "v1alpha1", "inferencepools"
    )
    assert not await kube(lambda r: httpx.Response(404, json={})).served(
        "tandem.dev", "v1alpha1", "inferencepools"
    )


def test_paths() -> None:
    assert kinds.SERVICES.path("ns", "x") == "/api/v1/namespaces/ns/services/x"
    assert kinds.POOLS.path() == "/apis/tandem.dev/v1alpha1/inferencepools"
    assert kinds.ROLES.path("ns") == "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/roles"


def test_credentials_from_a_kubeconfig(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "kubeconfig"  # type: ignore[operator]
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://1.2.3.4:6443",
                                                       "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"token": "abc"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u",
                                                       "namespace": "team"}}],
                "current-context": "x",
            }
        )
    )  # fmt: skip
    creds = client.load_credentials(str(path))
    assert creds.server == "https://1.2.3.4:6443"
    assert creds.insecure
    assert creds.authorization() == "Bearer abc"
    assert creds.namespace == "team"

"""Shared test material: pools, and an in-memory API that behaves enough like one."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.operator import api, applying, client, kinds, planning, validation

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
POOL_UID = "0a1b2c3d-0000-4000-8000-000000000001"

PoolFactory = Callable[..., api.InferencePool]


def pool_body(name: str = "tiny.yaml", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    body["metadata"].setdefault("namespace", "default")
    body["metadata"].update(uid=POOL_UID, generation=1)
    body["spec"].update(spec)
    return body


@pytest.fixture
def make_pool() -> PoolFactory:
    def make(name: str = "tiny.yaml", **spec: Any) -> api.InferencePool:
        return validation.parse_pool(pool_body(name, **spec))

    return make


def live_copy(obj: Mapping[str, Any], **meta: Any) -> dict[str, Any]:
    """What the API server would hand back for an applied object (roughly)."""
    out = copy.deepcopy(dict(obj))
    out["metadata"].setdefault("uid", f"uid-{obj['kind']}-{obj['metadata']['name']}")
    out["metadata"].setdefault("resourceVersion", "1")
    out["metadata"].update(meta)
    return out


class FakeKube:
    """An in-memory API: apply merges, tracks who owns ``spec.replicas``, bumps
    resourceVersion only on a change; enough for the controller's tests."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []
        self._rv = itertools.count(100)
        self.fail_apply: dict[str, client.ApiError] = {}

    @staticmethod
    def _key(resource: kinds.Resource, namespace: str | None, name: str) -> tuple[str, str, str]:
        return resource.plural, namespace or "", name

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        stored = live_copy(obj)
        stored["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[self._key(kinds.of(obj), obj["metadata"].get("namespace"),
                               obj["metadata"]["name"])] = stored  # fmt: skip
        return stored

    async def find(
        self, resource: kinds.Resource, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        found = self.objects.get(self._key(resource, namespace, name))
        return copy.deepcopy(found) if found else None

    async def get(self, resource: kinds.Resource, namespace: str | None, name: str) -> Any:
        found = await self.find(resource, namespace, name)
        if found is None:
            raise client.NotFoundError(404, "NotFound", name)
        return found

    async def list(
        self, resource: kinds.Resource, namespace: str | None, *, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        key, _, value = label_selector.partition("=")
        return [
            copy.deepcopy(o)
            for (plural, ns, _), o in sorted(self.objects.items())
            if plural == resource.plural
            and ns == (namespace or "")
            and (not key or o["metadata"].get("labels", {}).get(key) == value)
        ]

    async def apply(
        self,
        obj: Mapping[str, Any],
        *,
        field_manager: str,
        force: bool = False,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        if name in self.fail_apply:
            raise self.fail_apply[name]
        k = self._key(kinds.of(obj), obj["metadata"].get("namespace"), name)
        old = self.objects.get(k)
        if subresource == "status":
            assert old is not None
            new = copy.deepcopy(old)
            new["status"] = {**old.get("status", {}), **copy.deepcopy(obj["status"])}
        elif old is None:
            new = live_copy(obj)
            owners = [field_manager] if "replicas" in obj.get("spec", {}) else []
            new["metadata"]["managedFields"] = _managed(owners)
        else:
            new = copy.deepcopy(dict(obj))
            new["metadata"] = {**old["metadata"], **copy.deepcopy(obj["metadata"])}
            if "status" in old:
                new["status"] = old["status"]
            owners = _replica_owners(old)
            if field_manager == applying.AUTOSCALER_FIELD_MANAGER:
                # The autoscaler applies spec.replicas only: everything else stays.
                new = copy.deepcopy(old)
                new["spec"]["replicas"] = obj["spec"]["replicas"]
                owners = sorted({*owners, field_manager})
            elif "replicas" not in obj.get("spec", {}) and "replicas" in old.get("spec", {}):
                owners = [o for o in owners if o != field_manager]
                if owners:
                    new["spec"]["replicas"] = old["spec"]["replicas"]
                else:
                    new["spec"].pop("replicas", None)  # what SSA would do: the field goes
            new["metadata"]["managedFields"] = _managed(owners)
        if old is not None and _content(new) == _content(old):
            return copy.deepcopy(old)
        new["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[k] = new
        self.writes.append((field_manager, obj["kind"], name))
        return copy.deepcopy(new)

    async def delete(
        self, resource: kinds.Resource, namespace: str | None, name: str, *, uid: str | None = None
    ) -> bool:
        k = self._key(resource, namespace, name)
        if k not in self.objects or (uid and self.objects[k]["metadata"]["uid"] != uid):
            return False
        del self.objects[k]
        self.writes.append(("delete", resource.kind, name))
        return True


def _managed(replica_owners: list[str]) -> list[dict[str, Any]]:
    return [
        {"manager": m, "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        for m in replica_owners
    ]


def _replica_owners(obj: Mapping[str, Any]) -> list[str]:
    return [
        str(e["manager"])
        for e in obj["metadata"].get("managedFields", [])
        if applying.owns_replicas(e)
    ]


def _content(obj: Mapping[str, Any]) -> Any:
    out = copy.deepcopy(dict(obj))
    out["metadata"].pop("resourceVersion", None)
    return out


@pytest.fixture
def fake_kube() -> FakeKube:
    return FakeKube()


def planned(pool: api.InferencePool) -> dict[tuple[str, str], dict[str, Any]]:
    return {applying.key(o): o for o in planning.plan(pool)}

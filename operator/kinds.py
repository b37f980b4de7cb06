"""The Kubernetes resources the operator reads and writes, and the RBAC that allows it.

One table, so the API client's URLs, the pruning sweep, the child watches and
the Helm chart's ClusterRole all name the same resources (an e2e test renders
the chart and compares its rules with :func:`operator_cluster_rules`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import api


@dataclass(frozen=True)
class Resource:
    """One API resource: where it lives and what its objects are called."""

    group: str
    """API group; ``""`` for the core group."""
    version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The URL path of the collection, or of one object (and its subresource)."""
        out = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            out += f"/namespaces/{namespace}"
        out += f"/{self.plural}"
        if name:
            out += f"/{name}"
            if subresource:
                out += f"/{subresource}"
        return out


POOLS = Resource(api.GROUP, api.VERSION, api.KIND, api.PLURAL)
SERVICE_ACCOUNTS = Resource("", "v1", "ServiceAccount", "serviceaccounts")
CONFIG_MAPS = Resource("", "v1", "ConfigMap", "configmaps")
SERVICES = Resource("", "v1", "Service", "services")
DEPLOYMENTS = Resource("apps", "v1", "Deployment", "deployments")
PDBS = Resource("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets")
ROLES = Resource("rbac.authorization.k8s.io", "v1", "Role", "roles")
ROLE_BINDINGS = Resource("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings")
EVENTS = Resource("", "v1", "Event", "events")
LEASES = Resource("coordination.k8s.io", "v1", "Lease", "leases")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")

CHILDREN: tuple[Resource, ...] = (
    SERVICE_ACCOUNTS,
    ROLES,
    ROLE_BINDINGS,
    CONFIG_MAPS,
    SERVICES,
    PDBS,
    DEPLOYMENTS,
)
"""Every kind :func:`tandem.operator.planning.plan` may return (a test checks it)."""

_BY_KIND = {(r.api_version, r.kind): r for r in (*CHILDREN, POOLS, EVENTS, LEASES)}


def of(obj: Mapping[str, Any]) -> Resource:
    """The resource of an object, by its apiVersion and kind."""
    try:
        return _BY_KIND[(obj["apiVersion"], obj["kind"])]
    except KeyError:
        raise ValueError(
            f"unknown kind {obj.get('apiVersion')}/{obj.get('kind')}: not in tandem.operator.kinds"
        ) from None


# ---------------------------------------------------------------------------
# RBAC: exactly what the operator does, and why.

CHILD_VERBS = ("create", "delete", "get", "list", "patch", "watch")
"""Apply is a PATCH, authorized as ``create`` too when it creates; ``get`` before a
first create (to refuse adopting a stranger's object); list/watch to observe and
heal; delete to prune."""

POOL_VERBS = ("get", "list", "patch", "watch")
"""Watch the pools; ``patch``: kopf keeps its bookkeeping in annotations."""

POOL_STATUS_VERBS = ("patch",)
"""Status is written by server-side apply to the status subresource."""

EVENT_VERBS = ("create",)

ROUTER_GRANTS = ("get", "list", "watch")
"""The router's Role allows these on EndpointSlices. The API server only lets the
operator create such a Role (and bind it) if it holds the same permissions itself,
which is cheaper in trust than the ``escalate`` and ``bind`` verbs."""

LEASE_VERBS_NAMED = ("get", "update")
LEASE_VERBS_UNNAMED = ("create",)
"""Leader election: only the operator's own Lease, in its own namespace (``create``
cannot be restricted by name in RBAC)."""


def _rule(resource: Resource, verbs: tuple[str, ...], sub: str | None = None) -> dict[str, Any]:
    plural = f"{resource.plural}/{sub}" if sub else resource.plural
    return {"apiGroups": [resource.group], "resources": [plural], "verbs": sorted(verbs)}


def operator_cluster_rules() -> list[dict[str, Any]]:
    """The rules of the operator's ClusterRole, one resource per rule, sorted."""
    rules = [
        _rule(POOLS, POOL_VERBS),
        _rule(POOLS, POOL_STATUS_VERBS, "status"),
        _rule(EVENTS, EVENT_VERBS),
        _rule(ENDPOINT_SLICES, ROUTER_GRANTS),
    ]
    rules += [_rule(r, CHILD_VERBS) for r in CHILDREN]
    return sorted(rules, key=lambda r: (r["apiGroups"][0], r["resources"][0]))


def operator_lease_rules(lease_name: str) -> list[dict[str, Any]]:
    """The rules of the operator's Role in its own namespace (leader election)."""
    return [
        {**_rule(LEASES, LEASE_VERBS_NAMED), "resourceNames": [lease_name]},
        _rule(LEASES, LEASE_VERBS_UNNAMED),
    ]

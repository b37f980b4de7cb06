"""An asyncio client for the few Kubernetes API calls the operator makes.

httpx, not the ``kubernetes`` package's generated client: that client is
synchronous (a thread per call), untyped, and has no transport seam. Credentials
still come from the ``kubernetes`` package's loaders, so in-cluster service
accounts (with their rotating tokens) and kubeconfig files work as everywhere
else (:mod:`tandem.kubeconfig`, one loader for the operator and the router); kopf
gets the same credentials through its login hook.

Errors from the API and the network are translated here, once, into
:class:`ApiError` and its subclasses.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable, Generator, Mapping
from typing import Any

import httpx

from tandem import kubeconfig as tandem_kubeconfig

from . import kinds

logger = logging.getLogger(__name__)

K8sObject = dict[str, Any]

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"


class ApiError(Exception):
    """A failed API call: the HTTP status (0 when no answer came) and the server's message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def temporary(self) -> bool:
        """Worth retrying as is: no answer, a conflict, throttling, or a server error."""
        return self.status in (0, 409, 429) or self.status >= 500


class NotFoundError(ApiError):
    """404."""


class ConflictError(ApiError):
    """409: an optimistic-concurrency, field-manager or already-exists conflict."""


class ForbiddenError(ApiError):
    """403: RBAC does not allow it."""


class InvalidError(ApiError):
    """422: the object does not validate."""


_BY_STATUS: Mapping[int, type[ApiError]] = {404: NotFoundError, 409: ConflictError, 403: ForbiddenError,
                                             422: InvalidError}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to authenticate to it."""

    server: str
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False
    authorization: Callable[[], str | None] = lambda: None
    """The current ``Authorization`` header value (tokens rotate, so it is asked per request)."""
    namespace: str | None = None
    """The namespace of the kubeconfig context, or of the pod's service account."""


def load_credentials(kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """In-cluster credentials when running in a pod (and no kubeconfig is named), else
    the kubeconfig (:mod:`tandem.kubeconfig`, the loader the router uses too)."""
    creds = tandem_kubeconfig.auto(kubeconfig, context)
    return Credentials(
        server=creds.server,
        ca_path=creds.ca_file,
        cert_path=creds.cert_file,
        key_path=creds.key_file,
        insecure=creds.insecure,
        authorization=creds.authorization,
        namespace=creds.namespace,
    )


class _Auth(httpx.Auth):
    def __init__(self, authorization: Callable[[], str | None]) -> None:
        self._authorization = authorization

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        value = self._authorization()
        if value:
            request.headers["Authorization"] = value
        yield request


def _ssl_context(creds: Credentials) -> ssl.SSLContext | bool:
    if creds.insecure:
        return False
    context = ssl.create_default_context(cafile=creds.ca_path)
    if creds.cert_path and creds.key_path:
        context.load_cert_chain(creds.cert_path, creds.key_path)
    return context


def _stamp(items: list[K8sObject], resource: kinds.Resource) -> list[K8sObject]:
    # Items of a List carry no apiVersion/kind of their own.
    for item in items:
        item.setdefault("apiVersion", resource.api_version)
        item.setdefault("kind", resource.kind)
    return items


class Kube:
    """The API calls the operator makes; every method raises :class:`ApiError`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    @classmethod
    def connect(cls, creds: Credentials, *, timeout: float = 30.0) -> Kube:
        http = httpx.AsyncClient(
            base_url=creds.server,
            auth=_Auth(creds.authorization),
            verify=_ssl_context(creds),
            timeout=timeout,
            headers={"User-Agent": "tandem-operator", "Accept": "application/json"},
        )
        return cls(http)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content_type: str | None = None,
    ) -> K8sObject:
        headers = {"Content-Type": content_type} if content_type else None
        try:
            response = await self._http.request(
                method, path, params=params, json=json, headers=headers
            )
        except httpx.HTTPError as exc:
            raise ApiError(0, type(exc).__name__, f"{method} {path}: {exc}") from exc
        if response.is_success:
            body: K8sObject = response.json()
            return body
        try:
            status_body = response.json()
            message, reason = (
                str(status_body.get("message", "")),
                str(status_body.get("reason", "")),
            )
        except ValueError:
            message, reason = response.text[:500], response.reason_phrase
        error = _BY_STATUS.get(response.status_code, ApiError)
        raise error(response.status_code, reason, f"{method} {path}: {message}")

    async def get(self, resource: kinds.Resource, namespace: str | None, name: str) -> K8sObject:
        obj = await self._request("GET", resource.path(namespace, name))
        return _stamp([obj], resource)[0]

    async def find(
        self, resource: kinds.Resource, namespace: str | None, name: str
    ) -> K8sObject | None:
        """:meth:`get`, or None when the object does not exist."""
        try:
            return await self.get(resource, namespace, name)
        except NotFoundError:
            return None

    async def list(
        self, resource: kinds.Resource, namespace: str | None, *, label_selector: str = ""
    ) -> list[K8sObject]:
        items: list[K8sObject] = []
        params = {"labelSelector": label_selector, "limit": "500"} if label_selector else {}
        while True:
            page = await self._request("GET", resource.path(namespace), params=params)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return _stamp(items, resource)
            params = {**params, "continue": token}

    async def apply(
        self,
        obj: Mapping[str, Any],
        *,
        field_manager: str,
        force: bool = False,
        subresource: str | None = None,
    ) -> K8sObject:
        """Server-side apply (creates the object when it does not exist)."""
        resource = kinds.of(obj)
        meta = obj["metadata"]
        params = {"fieldManager": field_manager}
        if force:
            params["force"] = "true"
        path = resource.path(meta.get("namespace"), meta["name"], subresource)
        result = await self._request(
            "PATCH", path, params=params, json=obj, content_type=APPLY_CONTENT_TYPE
        )
        return _stamp([result], resource)[0]

    async def create(self, obj: Mapping[str, Any], *, field_manager: str) -> K8sObject:
        resource = kinds.of(obj)
        path = resource.path(obj["metadata"].get("namespace"))
        result = await self._request("POST", path, params={"fieldManager": field_manager}, json=obj)
        return _stamp([result], resource)[0]

    async def replace(self, obj: Mapping[str, Any], *, field_manager: str) -> K8sObject:
        """PUT; ``metadata.resourceVersion`` in ``obj`` makes it a compare-and-swap."""
        resource = kinds.of(obj)
        meta = obj["metadata"]
        path = resource.path(meta.get("namespace"), meta["name"])
        result = await self._request("PUT", path, params={"fieldManager": field_manager}, json=obj)
        return _stamp([result], resource)[0]

    async def delete(
        self, resource: kinds.Resource, namespace: str | None, name: str, *, uid: str | None = None
    ) -> bool:
        """Delete (background propagation); False when it was already gone.

        With ``uid``, only that very object: not a namesake created since.
        """
        body: K8sObject = {"kind": "DeleteOptions", "apiVersion": "v1",
                           "propagationPolicy": "Background"}  # fmt: skip
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._request("DELETE", resource.path(namespace, name), json=body)
        except NotFoundError:
            return False
        except ConflictError:
            # The uid precondition failed: a different object has the name now.
            return False
        return True

    async def served(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves a resource (its CRD is installed and established)."""
        try:
            found = await self._request("GET", f"/apis/{group}/{version}")
        except NotFoundError:
            return False
        return any(r.get("name") == plural for r in found.get("resources", []))

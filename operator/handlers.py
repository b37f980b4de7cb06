"""kopf handlers: thin shells that call the :class:`~.controller.Controller`.

- create / update / resume of an InferencePool: reconcile it;
- a timer per pool: reconcile again, healing drift the watches missed;
- an index of the pools, and watch events of every child kind: a child deleted,
  edited by hand or whose Deployment status moved triggers its pool's reconcile
  at once (the decision whether to is pure: :func:`.reconcile.child_trigger`);
- login: the same credentials as the controller's API client;
- a daemon per pool, when an :class:`~.autoscaler.Autoscaler` is given: its
  ticks, every ``spec.autoscaling.interval``.

Everything is registered on a registry passed in (no module-level state), and
handler ids are pinned, since kopf stores progress under them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kopf

from . import api, autoscaler, client, controller, kinds, planning, reconcile, validation
from .settings import OperatorSettings

KOPF_PREFIX = "kopf.tandem.dev"
"""kopf keeps its bookkeeping in annotations under this prefix (not in status:
the CRD's structural schema would prune it)."""

IndexKey = tuple[str, str]


def kopf_settings(settings: OperatorSettings, identity: str) -> kopf.OperatorSettings:
    out = kopf.OperatorSettings()
    out.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    out.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    # kopf's own log lines ("Handler ... succeeded") do not become Events; ours are posted
    # explicitly, one per thing done.
    out.posting.level = logging.WARNING
    out.posting.reporting_component = "tandem-operator"
    out.posting.reporting_instance = identity
    out.posting.event_name_prefix = "tandem-"
    # No CRD/namespace scanning: fewer permissions. The CRD must exist at start
    # (the CLI checks), which Helm guarantees by installing crds/ first.
    out.scanning.disabled = True
    # Leader election is ours (see .leader); kopf's peering would freeze equal replicas.
    out.peering.standalone = True
    out.peering.mandatory = False
    # Re-open watches regularly, so a silently dropped connection cannot stall us.
    out.watching.server_timeout = 300
    out.watching.client_timeout = 330
    out.networking.request_timeout = settings.request_timeout
    return out


def connection_info(creds: client.Credentials) -> kopf.ConnectionInfo:
    header = creds.authorization() or ""
    scheme, _, token = header.partition(" ")
    if not token:
        scheme, token = "", header
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=creds.ca_path,
        insecure=creds.insecure,
        scheme=scheme or None,
        token=token or None,
        certificate_path=creds.cert_path,
        private_key_path=creds.key_path,
        default_namespace=creds.namespace,
    )


def post(body: Mapping[str, Any], report: controller.Report) -> None:
    """Kubernetes Events on the pool for what a reconcile did.

    Warnings repeat on every resync while their cause lasts; they are posted only
    when they changed the status, so a lasting problem is one Event, not one a minute.
    """
    for notice in report.notices:
        if notice.type == "Warning" and not report.status_written:
            continue
        kopf.event(
            cast(kopf.Body, body), type=notice.type, reason=notice.reason, message=notice.message
        )


def _raise_for(report: controller.Report) -> None:
    invalid = [p for p in report.problems if p.reason == "InvalidSpec"]
    if invalid:
        raise kopf.PermanentError(invalid[0].message)
    if report.retry:
        raise kopf.TemporaryError("; ".join(p.message for p in report.problems), delay=10)


def register(
    registry: kopf.OperatorRegistry,
    ctl: controller.Controller,
    settings: OperatorSettings,
    creds: client.Credentials,
    scaler: autoscaler.Autoscaler | None = None,
) -> None:
    group, version, plural = api.GROUP, api.VERSION, api.PLURAL

    @kopf.on.login(id="login", registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(creds)

    @kopf.on.resume(group, version, plural, id="reconcile", registry=registry)
    @kopf.on.create(group, version, plural, id="reconcile", registry=registry)
    @kopf.on.update(group, version, plural, id="reconcile", registry=registry)
    async def reconcile_pool(body: kopf.Body, **_: Any) -> None:
        report = await ctl.reconcile(body)
        post(body, report)
        _raise_for(report)

    @kopf.timer(
        group,
        version,
        plural,
        id="resync",
        interval=settings.resync_interval,
        initial_delay=settings.resync_interval,
        registry=registry,
    )
    async def resync(body: kopf.Body, **_: Any) -> None:
        # Errors are not raised: the next tick is the retry.
        post(body, await ctl.reconcile(body))

    if scaler is not None:

        @kopf.daemon(
            group, version, plural, id="autoscale", cancellation_timeout=10, registry=registry
        )
        async def autoscale(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
            def post_notices(notices: Sequence[controller.Notice]) -> None:
                post(body, controller.Report(notices=list(notices), status_written=True))

            await scaler.run(body, stopped, post_notices)

    @kopf.on.delete(group, version, plural, id="forget", optional=True, registry=registry)
    async def forget(namespace: str | None, name: str | None, **_: Any) -> None:
        # No finalizer (optional): the children go by garbage collection.
        ctl.forget(namespace or "default", name or "")
        if scaler is not None:
            scaler.forget(namespace or "default", name or "")

    @kopf.index(group, version, plural, id="pools", registry=registry)
    async def pools(
        body: kopf.Body, namespace: str | None, name: str | None, **_: Any
    ) -> dict[IndexKey, api.InferencePool | None]:
        try:
            pool: api.InferencePool | None = validation.parse_pool(body)
        except validation.InvalidPoolError:
            pool = None
        return {(namespace or "default", name or ""): pool}

    async def child_event(
        event: kopf.RawEvent,
        body: kopf.Body,
        namespace: str | None,
        **kwargs: Any,
    ) -> None:
        pools: kopf.Index[IndexKey, api.InferencePool | None] = kwargs["pools"]
        owner = reconcile.owner_pool(body)
        if owner is None or namespace is None:
            return
        pool = next(iter(pools.get((namespace, owner), ())), None)
        if pool is None:
            return
        why = reconcile.child_trigger(
            pool, reconcile.ChildEvent(event.get("type"), body), ctl.plan_settings
        )
        if why is None:
            return
        logger = controller.PoolLogger(namespace, owner)
        logger.debug("Reconciling: %s", why)
        result = await ctl.reconcile_named(namespace, owner, logger)
        if result is not None:
            post(*result)

    for resource in kinds.CHILDREN:
        kopf.on.event(
            group=resource.group,
            version=resource.version,
            plural=resource.plural,
            labels={planning.LABEL_POOL: kopf.PRESENT},
            id=f"child-{resource.plural}",
            registry=registry,
        )(child_event)

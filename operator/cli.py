"""``tandem operator``: run the InferencePool operator.

    tandem operator                         # in a pod: in-cluster credentials, all namespaces
    tandem operator --kubeconfig ~/.kube/config --no-leader-elect --namespace team-a

The process checks that the CRD is served, starts its health endpoints, waits
for the leader Lease (unless ``--no-leader-elect``), then runs kopf until
SIGTERM (exit 0, Lease released) or until it loses the Lease (exit 1, so the
kubelet restarts it as a candidate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Sequence

import kopf

from tandem import kubeconfig

from . import api, autoscaler, client, controller, handlers, health, leader, planning
from .settings import LeaderElectionSettings, OperatorSettings

logger = logging.getLogger("tandem.operator")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    d = OperatorSettings()
    le = LeaderElectionSettings()
    p = argparse.ArgumentParser(
        prog="tandem operator",
        description="Run the InferencePool operator (kopf) against a Kubernetes API server.",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument(
        "--namespace",
        dest="namespaces",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    p.add_argument(
        "--router-image",
        default=planning.DEFAULT_ROUTER_IMAGE,
        help="router image for pools that name none (default: %(default)s)",
    )
    p.add_argument(
        "--resync-interval",
        type=float,
        default=d.resync_interval,
        metavar="SECONDS",
        help="drift check of each pool every this many seconds (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-source",
        choices=["auto", "prometheus", "embedded", "off"],
        default="auto",
        help="where the autoscaler reads the pools' signals: Prometheus, or the pods' own "
        "/metrics scraped by the operator (embedded); auto: Prometheus when "
        "--prometheus-url is given, else embedded; off: no autoscaling (default: %(default)s)",
    )
    p.add_argument(
        "--prometheus-url",
        metavar="URL",
        help="Prometheus HTTP API scraping the workers, for the autoscaler (default: none)",
    )
    p.add_argument(
        "--prometheus-timeout",
        type=float,
        default=autoscaler.AutoscalerSettings().prometheus_timeout,
        metavar="SECONDS",
        help="seconds each Prometheus query may take (default: %(default)s)",
    )
    p.add_argument("--health-host", default=d.health_host, help="default: %(default)s")
    p.add_argument(
        "--health-port",
        type=int,
        default=d.health_port,
        help="/healthz and /readyz port, 0 to disable (default: %(default)s)",
    )
    p.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=le.enabled,
        help="run only while holding the leader Lease (default: on)",
    )
    p.add_argument("--lease-name", default=le.lease_name, help="default: %(default)s")
    p.add_argument(
        "--lease-namespace",
        help="default: $POD_NAMESPACE, the service account's or the context's namespace",
    )
    p.add_argument("--lease-duration", type=float, default=le.lease_duration, metavar="SECONDS")
    p.add_argument("--renew-deadline", type=float, default=le.renew_deadline, metavar="SECONDS")
    p.add_argument("--retry-period", type=float, default=le.retry_period, metavar="SECONDS")
    p.add_argument("--identity", help="this replica's name in the Lease (default: host name)")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="default: %(default)s",
    )
    p.add_argument(
        "--log-format",
        choices=["plain", "full", "json"],
        default="full",
        help="default: %(default)s",
    )
    return p


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    if args.resync_interval <= 0:
        raise ValueError("--resync-interval must be positive")
    if not 0 < args.retry_period < args.renew_deadline < args.lease_duration:
        raise ValueError("need 0 < --retry-period < --renew-deadline < --lease-duration")
    return OperatorSettings(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespaces=tuple(args.namespaces),
        plan=planning.PlanSettings(router_image=args.router_image),
        resync_interval=args.resync_interval,
        health_host=args.health_host,
        health_port=args.health_port,
        leader_election=LeaderElectionSettings(
            enabled=args.leader_elect,
            lease_name=args.lease_name,
            lease_namespace=args.lease_namespace,
            identity=args.identity,
            lease_duration=args.lease_duration,
            renew_deadline=args.renew_deadline,
            retry_period=args.retry_period,
        ),
    )


def autoscaler_settings_from(args: argparse.Namespace) -> autoscaler.AutoscalerSettings:
    url = args.prometheus_url or None
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError("--prometheus-url must be an http:// or https:// URL")
    if args.prometheus_timeout <= 0:
        raise ValueError("--prometheus-timeout must be positive")
    if args.metrics_source == "prometheus" and url is None:
        raise ValueError("--metrics-source=prometheus needs --prometheus-url")
    return autoscaler.AutoscalerSettings(
        prometheus_url=url,
        prometheus_timeout=args.prometheus_timeout,
        metrics_source=args.metrics_source,
    )


def _configure_logging(level: str, fmt: str) -> None:
    formats = {"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL,
               "json": kopf.LogFormat.JSON}  # fmt: skip
    kopf.configure(
        debug=level == "debug", quiet=level in ("warning", "error"), log_format=formats[fmt],
        log_prefix=True,
    )  # fmt: skip
    logging.getLogger().setLevel(level.upper())
    # A line per API request (and per socket event) drowns everything else.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # kopf says "Handler ... succeeded" for every watch event of every child; the
    # controller logs what it actually does, per pool.
    if level != "debug":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        settings = settings_from(args)
        scaling = autoscaler_settings_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    _configure_logging(args.log_level, args.log_format)
    try:
        return asyncio.run(run(settings, scaling))
    except KeyboardInterrupt:
        return EXIT_FAILED


def _identity(settings: LeaderElectionSettings) -> str:
    return settings.identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _lease_namespace(settings: LeaderElectionSettings, creds: client.Credentials) -> str:
    return (
        settings.lease_namespace or os.environ.get("POD_NAMESPACE") or creds.namespace or "default"
    )


async def run(
    settings: OperatorSettings, scaling: autoscaler.AutoscalerSettings | None = None
) -> int:
    try:
        creds = client.load_credentials(settings.kubeconfig, settings.context)
    except (kubeconfig.KubeconfigError, KeyError, OSError) as exc:
        logger.error("No Kubernetes credentials: %s", exc)
        return EXIT_USAGE
    kube = client.Kube.connect(creds, timeout=settings.request_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in ("SIGINT", "SIGTERM"):
        with contextlib.suppress(NotImplementedError, AttributeError):
            import signal

            loop.add_signal_handler(getattr(signal, sig), stop.set)

    kopf_task: asyncio.Task[None] | None = None
    kopf_ready = asyncio.Event()
    server = health.HealthServer(
        settings.health_host,
        settings.health_port,
        live=lambda: kopf_task is None or not kopf_task.done(),
        ready=lambda: kopf_task is None or kopf_ready.is_set(),
    )
    try:
        try:
            served = await kube.served(api.GROUP, api.VERSION, api.PLURAL)
        except client.ApiError as exc:
            logger.error("Cannot reach the API server: %s", exc)
            return EXIT_FAILED
        if not served:
            logger.error(
                "The API server does not serve %s.%s/%s: install the CRD first "
                "(helm install, or kubectl apply -f crds/)",
                api.PLURAL,
                api.GROUP,
                api.VERSION,
            )
            return EXIT_FAILED
        if settings.health_port:
            await server.start()

        identity = _identity(settings.leader_election)
        elector: leader.LeaderElector | None = None
        if settings.leader_election.enabled:
            elector = leader.LeaderElector(
                kube,
                settings.leader_election,
                _lease_namespace(settings.leader_election, creds),
                identity,
            )
            if not await elector.acquire(stop):
                return EXIT_OK

        registry = kopf.OperatorRegistry()
        ctl = controller.Controller(kube, settings.plan)
        scaling = scaling or autoscaler.AutoscalerSettings()
        if scaling.kind == "prometheus":
            logger.info("Autoscaler on: signals from Prometheus at %s", scaling.prometheus_url)
        elif scaling.kind == "embedded":
            logger.info("Autoscaler on: signals scraped from the pools' pods (no Prometheus)")
        else:
            logger.warning(
                "Autoscaler off (--metrics-source=off); worker replicas stay as they are "
                "(each pool says so in its MetricsAvailable condition)"
            )
        scaler = autoscaler.Autoscaler(kube, scaling.source(kube))
        handlers.register(registry, ctl, settings, creds, scaler)
        kopf_task = asyncio.create_task(
            kopf.operator(
                registry=registry,
                settings=handlers.kopf_settings(settings, identity),
                standalone=True,
                clusterwide=not settings.namespaces,
                namespaces=settings.namespaces,
                ready_flag=kopf_ready,
            ),
            name="kopf",
        )
        guard = asyncio.create_task(
            elector.hold(stop) if elector is not None else stop.wait(), name="guard"
        )
        await asyncio.wait({kopf_task, guard}, return_when=asyncio.FIRST_COMPLETED)
        code = EXIT_OK
        if guard.done() and not guard.cancelled() and guard.exception() is not None:
            logger.error("Stopping: %s", guard.exception())
            code = EXIT_FAILED
        # kopf first: until it has stopped, this process still acts and must keep the Lease.
        # (Cancelled rather than given a stop flag: kopf waits 5 s for a flag waiter on
        # SIGTERM, which kopf handles itself once it runs.)
        kopf_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await kopf_task
        if not kopf_task.cancelled() and kopf_task.exception() is not None:
            logger.error("kopf stopped with an error: %s", kopf_task.exception())
            code = EXIT_FAILED
        guard.cancel()
        with contextlib.suppress(asyncio.CancelledError, leader.LeadershipLostError):
            await guard
        if elector is not None and code == EXIT_OK:
            await elector.release()
        return code
    finally:
        await server.stop()
        await kube.aclose()

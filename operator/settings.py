"""Settings of the operator process (``tandem operator --help`` sets them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import planning


@dataclass(frozen=True)
class LeaderElectionSettings:
    """Only the holder of a Lease reconciles; the other replicas wait to take over."""

    enabled: bool = True
    """Off: this process reconciles at once (one replica only, or a developer's laptop)."""

    lease_name: str = "tandem-operator"
    """The coordination.k8s.io Lease every replica competes for."""

    lease_namespace: str | None = None
    """Where the Lease is; default: the pod's namespace (``POD_NAMESPACE``, or the
    service account's), else the kubeconfig context's, else ``default``."""

    identity: str | None = None
    """This replica's name in the Lease; default: the host (pod) name and a random suffix."""

    lease_duration: float = 15.0
    """Seconds a Lease stays valid without renewal; a successor waits this long."""

    renew_deadline: float = 10.0
    """The leader gives up (and exits) when it could not renew for this long."""

    retry_period: float = 2.0
    """Seconds between attempts to acquire or renew."""


@dataclass(frozen=True)
class OperatorSettings:
    """Everything ``tandem operator`` is told."""

    kubeconfig: str | None = None
    """A kubeconfig file; default: in-cluster credentials, else ``$KUBECONFIG`` or ~/.kube/config."""

    context: str | None = None
    """The kubeconfig context; default: its current context."""

    namespaces: tuple[str, ...] = ()
    """Watch only these namespaces; empty: the whole cluster."""

    plan: planning.PlanSettings = field(default_factory=planning.PlanSettings)
    """What the plan depends on (the router image)."""

    resync_interval: float = 60.0
    """Seconds between drift checks of each pool (child watch events heal sooner)."""

    health_host: str = "0.0.0.0"
    """Where the liveness and readiness endpoints listen (``/healthz``, ``/readyz``)."""

    health_port: int = 8081
    """Their port; 0 disables them."""

    leader_election: LeaderElectionSettings = field(default_factory=LeaderElectionSettings)

    request_timeout: float = 30.0
    """Seconds one API request of the reconciler may take."""

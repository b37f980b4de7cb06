"""Fixtures for e2e/cluster: a real single-node cluster from ``scripts/cluster.sh``.

Every test here is marked ``cluster``. ``cluster_kubeconfig`` (session) brings the
cluster up once (a cold machine builds the binaries first: minutes) and runs
``down`` at the end unless ``TANDEM_KEEP_CLUSTER=1``. A node that cannot come up
fails the tests; ``TANDEM_SKIP_CLUSTER=1`` skips them instead. Two sessions on
one machine take turns (a flock held for the whole session), since the cluster
is machine-wide.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e.cluster import node

HERE = Path(__file__).resolve().parent
SESSION_LOCK = Path("/run/lock/tandem-cluster-session.lock")
MARKER = "cluster: needs a real single-node Kubernetes cluster (scripts/cluster.sh; root; TANDEM_SKIP_CLUSTER=1 skips)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.cluster)


def _say(request: pytest.FixtureRequest, message: str) -> None:
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"cluster: {message}")


@pytest.fixture(scope="session")
def say(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Print a progress line now, past pytest's capture (long waits stay visible)."""
    return lambda message: _say(request, message)


@pytest.fixture(scope="session")
def cluster_kubeconfig(request: pytest.FixtureRequest) -> Iterator[Path]:
    if os.environ.get("TANDEM_SKIP_CLUSTER") == "1":
        pytest.skip("TANDEM_SKIP_CLUSTER=1")
    if os.geteuid() != 0:
        pytest.fail(
            "the cluster tests need root (bridge, mounts, cgroups); TANDEM_SKIP_CLUSTER=1 skips them"
        )
    SESSION_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with SESSION_LOCK.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(request, f"waiting for another test session's cluster ({SESSION_LOCK})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        _say(request, "scripts/cluster.sh up (a cold machine builds the binaries first: minutes)")
        try:
            kubeconfig = node.up()
        except node.ClusterError as exc:
            pytest.fail(f"the node did not come up: {exc}", pytrace=False)
        try:
            yield kubeconfig
        finally:
            if os.environ.get("TANDEM_KEEP_CLUSTER") == "1":
                _say(
                    request, f"kept running (TANDEM_KEEP_CLUSTER=1): export KUBECONFIG={kubeconfig}"
                )
            else:
                node.down()

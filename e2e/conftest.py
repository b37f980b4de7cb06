"""Session fixtures shared by every e2e tier, defined once here so a session that
runs several tiers starts one control plane and finds Prometheus once.

``kubeconfig`` yields the path of an admin kubeconfig:

- ``KUBECONFIG`` naming an existing file: that cluster, used as is;
- otherwise a local control plane (etcd, kube-apiserver, kube-controller-manager)
  built once by ``scripts/build-controlplane.sh`` into
  ``${TANDEM_CACHE_DIR:-~/.cache/tandem}`` and started for the session.

A control plane that cannot be built or started fails the tests loudly;
``TANDEM_SKIP_K8S=1`` skips them instead, without building anything.

``prometheus_bin`` finds the server (``TANDEM_PROMETHEUS`` naming a binary, else
``prometheus`` on PATH, else the Debian package's ``/usr/bin/prometheus``); when
none is there and we are root on a Debian-like system it installs the Debian
package. Missing and not installable fails the tests loudly;
``TANDEM_SKIP_PROMETHEUS=1`` skips them instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.k8s import controlplane

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-controlplane.sh"


def _existing_kubeconfig() -> Path | None:
    value = os.environ.get("KUBECONFIG", "")
    if value and Path(value).is_file():
        return Path(value)
    return None


def _say(request: pytest.FixtureRequest, message: str) -> None:
    """A line on the terminal even while output is captured (a cold build is long)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"k8s: {message}")


def _build(request: pytest.FixtureRequest, log_path: Path) -> Path:
    """Run the build script (a no-op when the cache is current); the bin folder."""
    _say(request, f"scripts/build-controlplane.sh (a cold build takes minutes; log: {log_path})")
    started = time.monotonic()
    with log_path.open("wb") as log:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=log, check=False
        )
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(
            f"scripts/build-controlplane.sh failed (exit {result.returncode}); set "
            f"TANDEM_SKIP_K8S=1 to skip the k8s tests, or KUBECONFIG to use a cluster.\n{tail}",
            pytrace=False,
        )
    _say(request, f"control plane binaries ready ({time.monotonic() - started:.0f} s)")
    return Path(result.stdout.decode().split()[-1])


@pytest.fixture(scope="session")
def controlplane_bin_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path | None:
    """The folder of the locally built binaries; None when KUBECONFIG names a cluster."""
    if _existing_kubeconfig() is not None:
        return None
    if os.environ.get("TANDEM_SKIP_K8S") == "1":
        pytest.skip("TANDEM_SKIP_K8S=1 and no KUBECONFIG file")
    return _build(request, tmp_path_factory.mktemp("controlplane-build") / "build.log")


@pytest.fixture(scope="session")
def kubeconfig(
    controlplane_bin_dir: Path | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Path of a kubeconfig whose current context is a cluster admin."""
    existing = _existing_kubeconfig()
    if controlplane_bin_dir is None and existing is not None:
        yield existing
        return
    assert controlplane_bin_dir is not None
    try:
        plane = controlplane.ControlPlane(
            controlplane.Binaries.in_dir(controlplane_bin_dir),
            tmp_path_factory.mktemp("controlplane"),
        )
        plane.start()
    except controlplane.ControlPlaneError as exc:
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    try:
        yield plane.kubeconfig
    finally:
        plane.stop()


def _find() -> str | None:
    named = os.environ.get("TANDEM_PROMETHEUS")
    if named:
        return named if Path(named).is_file() else None
    return shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )


def _install(log: Path) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("wb") as out:
        for cmd in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
        ):
            subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600, check=False
            )


@pytest.fixture(scope="session")
def prometheus_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    if os.environ.get("TANDEM_SKIP_PROMETHEUS") == "1":
        pytest.skip("TANDEM_SKIP_PROMETHEUS=1")
    found = _find()
    if found is None:
        log = tmp_path_factory.mktemp("prometheus-install") / "apt.log"
        _install(log)
        found = _find()
        if found is None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(
                "Prometheus not found: install the Debian package (apt-get install prometheus), "
                "or set TANDEM_PROMETHEUS to a binary, or TANDEM_SKIP_PROMETHEUS=1 to skip.\n"
                + tail,
                pytrace=False,
            )
    return found

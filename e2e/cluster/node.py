"""Python handle on ``scripts/cluster.sh``: a real single-node Kubernetes cluster
(kubelet + containerd + bridge CNI + kube-proxy beside the control plane) on this
machine, for tests.

    kubeconfig = node.up()            # reuses a healthy running cluster
    node.kubectl(kubeconfig, "get", "nodes")
    node.down()
    assert node.leftovers() == []

Everything goes through the script (root needed), so a user at a shell and the
tests get the same cluster; the script serializes itself with a flock.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
SCRIPT: Final = REPO_ROOT / "scripts" / "cluster.sh"
NODE_NAME: Final = "tandem-node"
PAUSE_IMAGE: Final = "tandem.local/pause:latest"
ECHO_IMAGE: Final = "tandem.local/echo:latest"
"""``/echo`` serves ``echo <hostname> <method> <path>`` on $PORT (8080);
``/echo get URL`` is its client (the image has no shell)."""


class ClusterError(RuntimeError):
    """``scripts/cluster.sh`` failed; the message ends with its output."""


def state_dir() -> Path:
    return Path(os.environ.get("TANDEM_CLUSTER_DIR", REPO_ROOT / ".tandem" / "cluster"))


def _script(*args: str, timeout: float) -> str:
    try:
        result = subprocess.run(
            ["bash", str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(
            f"scripts/cluster.sh {' '.join(args)} timed out after {timeout:.0f} s"
        ) from exc
    if result.returncode != 0:
        raise ClusterError(
            f"scripts/cluster.sh {' '.join(args)} exited with {result.returncode}:\n"
            + "\n".join((result.stdout + result.stderr).splitlines()[-60:])
        )
    return result.stdout + result.stderr


def up(*, fresh: bool = False, timeout: float = 1800.0) -> Path:
    """Bring the cluster up (building binaries on a cold machine); its admin kubeconfig."""
    _script("up", *(["--fresh"] if fresh else []), timeout=timeout)
    kubeconfig = state_dir() / "kubeconfig"
    if not kubeconfig.is_file():
        raise ClusterError(f"scripts/cluster.sh up wrote no {kubeconfig}")
    return kubeconfig


def down(*, purge: bool = False, timeout: float = 300.0) -> str:
    """Stop everything and remove every trace (idempotent); the script's output."""
    return _script("down", *(["--purge"] if purge else []), timeout=timeout)


def leftovers(timeout: float = 120.0) -> list[str]:
    """What a cluster leaves on this machine, one line per item; ``[]`` when clean."""
    return [line for line in _script("leftovers", timeout=timeout).splitlines() if line.strip()]


def load(archive: Path, timeout: float = 1800.0) -> None:
    """Import an OCI image archive into the running node."""
    _script("load", str(archive), timeout=timeout)


def kubectl(
    kubeconfig: Path,
    *args: str,
    timeout: float = 120.0,
    check: bool = True,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The machine's kubectl against the cluster (discovery cache in the state dir)."""
    result = subprocess.run(
        [
            "kubectl",
            "--kubeconfig",
            str(kubeconfig),
            "--cache-dir",
            str(state_dir() / "kube-cache"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"kubectl {' '.join(args)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result


def pids() -> dict[str, int]:
    """PIDs from the script's pid files (whether or not they still run)."""
    found = {}
    for path in (state_dir() / "run").glob("*.pid"):
        text = path.read_text().strip()
        if text.isdigit():
            found[path.stem] = int(text)
    return found


def images_dir() -> Path:
    """Where ``up`` finds the OCI archives it imports (``scripts/build-images.sh`` writes them)."""
    return Path(os.environ.get("TANDEM_IMAGES_DIR", REPO_ROOT / ".tandem" / "images"))


def helm_binary(timeout: float = 600.0) -> Path:
    """The helm 3 binary from ``scripts/install-helm.sh`` (cached; its last stdout line)."""
    try:
        result = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "install-helm.sh")],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"scripts/install-helm.sh timed out after {timeout:.0f} s") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ClusterError(f"scripts/install-helm.sh failed: {result.stderr.strip()[-2000:]}")
    return Path(lines[-1])


def helm(
    kubeconfig: Path, *args: str, timeout: float = 300.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """helm against the cluster (its caches and config in the state dir, not in ~)."""
    home = state_dir() / "helm"
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    result = subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=REPO_ROOT,
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"helm {' '.join(args)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result

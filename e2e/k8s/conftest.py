"""The tests under e2e/k8s are all marked ``k8s``; their session fixtures
(``kubeconfig``, ``controlplane_bin_dir``) live in e2e/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-controlplane.sh"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.k8s)

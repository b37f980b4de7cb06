"""The emulator's metric families against a live vLLM CPU server's /metrics."""

from __future__ import annotations

import pytest

from e2e.vllm import cluster
from tests.emulator.test_metrics_parity import check_parity, vllm_families

pytestmark = pytest.mark.vllm


def test_emulator_matches_a_live_vllm_server(vllm_cluster: cluster.Cluster) -> None:
    check_parity(vllm_families(cluster.scrape_text(vllm_cluster.decode)))

"""The emulator's /metrics against a real vLLM scrape (recorded by the vllm tier).

e2e/vllm/test_metrics_parity.py makes the same check against a live server.
"""

from __future__ import annotations

from pathlib import Path

from tandem.workers.emulator import metrics

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "e2e" / "vllm" / "data" / "vllm_metrics_sample.txt"

# What the router (least-load scraping), the autoscaler (PromQL) and local mode read.
READ_BY_TANDEM = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_success": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:prompt_tokens_by_source": "counter",
    "vllm:nixl_bytes_transferred": "histogram",
    "vllm:nixl_num_failed_transfers": "counter",
}


def vllm_families(text: str) -> dict[str, str]:
    return {name: kind for name, kind in metrics.family_names(text) if name.startswith("vllm:")}


def check_parity(real: dict[str, str]) -> None:
    emulated = dict(metrics.METRIC_TYPES)
    for name, kind in READ_BY_TANDEM.items():
        assert real.get(name) == kind, (
            f"real vLLM: {name} is {real.get(name)}, Tandem reads a {kind}"
        )
        assert emulated.get(name) == kind, (
            f"emulator: {name} is {emulated.get(name)}, expected {kind}"
        )
    extra = sorted(set(emulated) - set(real))
    assert not extra, f"the emulator exposes families real vLLM does not: {extra}"
    wrong = {n: (emulated[n], real[n]) for n in emulated if emulated[n] != real[n]}
    assert not wrong, f"types differ (emulator, vLLM): {wrong}"


def test_emulator_matches_the_recorded_vllm_scrape() -> None:
    check_parity(vllm_families(SAMPLE.read_text()))


def test_the_recorded_scrape_is_a_real_vllm_one() -> None:
    text = SAMPLE.read_text()
    assert 'source="external_kv_transfer"' in text
    assert "vllm:nixl_bytes_transferred_sum" in text

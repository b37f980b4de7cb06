"""vLLM's Prometheus metric names: the one place they are spelled.

Family names as ``prometheus_client.parser`` reads them back from vLLM v1 (names,
types, labels and buckets follow ``vllm/v1/metrics/loggers.py`` and the NIXL
connector's metrics); a counter ``vllm:x`` is exposed as the sample ``vllm:x_total``.
The autoscaling signals, the router's load scrape, the engine emulator and the
drain script all name metrics through these constants. This module imports nothing.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Final

NUM_REQUESTS_RUNNING: Final = "vllm:num_requests_running"
NUM_REQUESTS_WAITING: Final = "vllm:num_requests_waiting"
KV_CACHE_USAGE_PERC: Final = "vllm:kv_cache_usage_perc"
CACHE_CONFIG_INFO: Final = "vllm:cache_config_info"
PREFIX_CACHE_QUERIES: Final = "vllm:prefix_cache_queries"
PREFIX_CACHE_HITS: Final = "vllm:prefix_cache_hits"
NUM_PREEMPTIONS: Final = "vllm:num_preemptions"
PROMPT_TOKENS: Final = "vllm:prompt_tokens"
PROMPT_TOKENS_BY_SOURCE: Final = "vllm:prompt_tokens_by_source"
PROMPT_TOKENS_CACHED: Final = "vllm:prompt_tokens_cached"
GENERATION_TOKENS: Final = "vllm:generation_tokens"
REQUEST_SUCCESS: Final = "vllm:request_success"
REQUEST_PROMPT_TOKENS: Final = "vllm:request_prompt_tokens"
REQUEST_GENERATION_TOKENS: Final = "vllm:request_generation_tokens"
ITERATION_TOKENS_TOTAL: Final = "vllm:iteration_tokens_total"
REQUEST_MAX_NUM_GENERATION_TOKENS: Final = "vllm:request_max_num_generation_tokens"
REQUEST_PARAMS_N: Final = "vllm:request_params_n"
REQUEST_PARAMS_MAX_TOKENS: Final = "vllm:request_params_max_tokens"
TIME_TO_FIRST_TOKEN_SECONDS: Final = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY_SECONDS: Final = "vllm:inter_token_latency_seconds"
REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS: Final = "vllm:request_time_per_output_token_seconds"
E2E_REQUEST_LATENCY_SECONDS: Final = "vllm:e2e_request_latency_seconds"
REQUEST_QUEUE_TIME_SECONDS: Final = "vllm:request_queue_time_seconds"
REQUEST_INFERENCE_TIME_SECONDS: Final = "vllm:request_inference_time_seconds"
REQUEST_PREFILL_TIME_SECONDS: Final = "vllm:request_prefill_time_seconds"
REQUEST_DECODE_TIME_SECONDS: Final = "vllm:request_decode_time_seconds"
NIXL_XFER_TIME_SECONDS: Final = "vllm:nixl_xfer_time_seconds"
NIXL_POST_TIME_SECONDS: Final = "vllm:nixl_post_time_seconds"
NIXL_BYTES_TRANSFERRED: Final = "vllm:nixl_bytes_transferred"
NIXL_NUM_DESCRIPTORS: Final = "vllm:nixl_num_descriptors"
NIXL_NUM_FAILED_TRANSFERS: Final = "vllm:nixl_num_failed_transfers"
NIXL_NUM_FAILED_NOTIFICATIONS: Final = "vllm:nixl_num_failed_notifications"
NIXL_NUM_KV_EXPIRED_REQS: Final = "vllm:nixl_num_kv_expired_reqs"

KV_USAGE_LEGACY: Final = "vllm:gpu_cache_usage_perc"
"""What vLLM before v0.10 called :data:`KV_CACHE_USAGE_PERC`."""

TYPES: Mapping[str, str] = types.MappingProxyType(
    {
        # Scheduler state.
        NUM_REQUESTS_RUNNING: "gauge",
        NUM_REQUESTS_WAITING: "gauge",
        KV_CACHE_USAGE_PERC: "gauge",
        CACHE_CONFIG_INFO: "gauge",
        # Counters (exposed with a ``_total`` suffix).
        PREFIX_CACHE_QUERIES: "counter",
        PREFIX_CACHE_HITS: "counter",
        NUM_PREEMPTIONS: "counter",
        PROMPT_TOKENS: "counter",
        PROMPT_TOKENS_BY_SOURCE: "counter",
        PROMPT_TOKENS_CACHED: "counter",
        GENERATION_TOKENS: "counter",
        REQUEST_SUCCESS: "counter",
        # Histograms of counts.
        REQUEST_PROMPT_TOKENS: "histogram",
        REQUEST_GENERATION_TOKENS: "histogram",
        ITERATION_TOKENS_TOTAL: "histogram",
        REQUEST_MAX_NUM_GENERATION_TOKENS: "histogram",
        REQUEST_PARAMS_N: "histogram",
        REQUEST_PARAMS_MAX_TOKENS: "histogram",
        # Histograms of time.
        TIME_TO_FIRST_TOKEN_SECONDS: "histogram",
        INTER_TOKEN_LATENCY_SECONDS: "histogram",
        REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS: "histogram",
        E2E_REQUEST_LATENCY_SECONDS: "histogram",
        REQUEST_QUEUE_TIME_SECONDS: "histogram",
        REQUEST_INFERENCE_TIME_SECONDS: "histogram",
        REQUEST_PREFILL_TIME_SECONDS: "histogram",
        REQUEST_DECODE_TIME_SECONDS: "histogram",
        # NIXL connector.
        NIXL_XFER_TIME_SECONDS: "histogram",
        NIXL_POST_TIME_SECONDS: "histogram",
        NIXL_BYTES_TRANSFERRED: "histogram",
        NIXL_NUM_DESCRIPTORS: "histogram",
        NIXL_NUM_FAILED_TRANSFERS: "counter",
        NIXL_NUM_FAILED_NOTIFICATIONS: "counter",
        NIXL_NUM_KV_EXPIRED_REQS: "counter",
    }
)
"""Family name -> Prometheus type, of every family vLLM (and the emulator) exposes."""

PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
"""Values of the ``source`` label of :data:`PROMPT_TOKENS_BY_SOURCE`."""


def normalize(name: str) -> str:
    """``vllm_x`` → ``vllm:x``: prometheus_client (0.26) escapes the colon of sample
    names when the scraper negotiates OpenMetrics, so one metric arrives under
    either spelling depending on the client library's version."""
    return "vllm:" + name[5:] if name.startswith("vllm_") else name

"""The ``vllm:`` Prometheus metrics, with vLLM v1's names, types, labels and buckets.

Names and buckets follow ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``)
and the NIXL connector's ``NixlPromMetrics``; every family carries the labels
``model_name`` and ``engine`` (``"0"``), plus ``finished_reason`` on
``vllm:request_success`` and ``source`` on ``vllm:prompt_tokens_by_source``.
Each :class:`EngineMetrics` has its own registry: two emulators in one process
(tests) do not share counters. ``_created`` series are left out, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tandem import vllm_metrics
from tandem.workers.emulator import scheduling

__all__ = ["CONTENT_TYPE", "METRIC_NAMES", "METRIC_TYPES", "EngineMetrics", "family_names"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

METRIC_TYPES: Mapping[str, str] = vllm_metrics.TYPES
"""Family name -> Prometheus type. Family names are as ``prometheus_client.parser``
reads them back: a counter ``vllm:x`` is exposed as the sample ``vllm:x_total``."""

METRIC_NAMES: frozenset[str] = frozenset(METRIC_TYPES)

PROMPT_SOURCES = vllm_metrics.PROMPT_SOURCES

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_NIXL_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
_NIXL_BYTES_BUCKETS = tuple(2 ** (10 + i) for i in range(1, 25, 2))  # 2 KiB .. 8 GiB
_NIXL_DESCRIPTOR_BUCKETS = (
    10,
    20,
    30,
    50,
    75,
    100,
    200,
    400,
    1000,
    2000,
    4000,
    10000,
    20000,
    50000,
)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        scale *= 10


class _WithoutCreated(Collector):
    """The families of a registry minus their ``_created`` samples."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class EngineMetrics:
    """The ``vllm:`` families of one engine, fed by :meth:`record`."""

    def __init__(
        self,
        model_name: str,
        *,
        stats: Callable[[], scheduling.SchedulerStats],
        max_model_len: int,
        cache_info: Mapping[str, str],
        descriptors_per_block: int = 1,
        engine: str = "0",
    ) -> None:
        registry = CollectorRegistry(auto_describe=True)
        self._export = CollectorRegistry(auto_describe=False)
        self._export.register(_WithoutCreated(registry))
        self._descriptors_per_block = descriptors_per_block
        names = ["model_name", "engine"]
        values = (model_name, engine)

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            Gauge(name, doc, names, registry=registry).labels(*values).set_function(read)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=registry).labels(*values)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, names, buckets=tuple(buckets), registry=registry).labels(
                *values
            )

        gauge(
            vllm_metrics.NUM_REQUESTS_RUNNING,
            "Number of requests in model execution batches.",
            lambda: stats().num_running,
        )
        gauge(
            vllm_metrics.NUM_REQUESTS_WAITING,
            "Number of requests waiting to be processed.",
            lambda: stats().num_waiting,
        )
        gauge(
            vllm_metrics.KV_CACHE_USAGE_PERC,
            "KV-cache usage. 1 means 100 percent usage.",
            lambda: stats().kv_usage,
        )
        info = {**cache_info, "engine": engine}
        Gauge(
            vllm_metrics.CACHE_CONFIG_INFO,
            "Information of the LLMEngine CacheConfig",
            sorted(info),
            registry=registry,
        ).labels(**info).set(1)

        self.prefix_cache_queries = counter(
            vllm_metrics.PREFIX_CACHE_QUERIES,
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            vllm_metrics.PREFIX_CACHE_HITS,
            "Prefix cache hits, in terms of number of cached tokens.",
        )
        self.num_preemptions = counter(
            vllm_metrics.NUM_PREEMPTIONS, "Cumulative number of preemption from the engine."
        )
        self.prompt_tokens = counter(
            vllm_metrics.PROMPT_TOKENS, "Number of prefill tokens processed."
        )
        by_source = Counter(
            vllm_metrics.PROMPT_TOKENS_BY_SOURCE,
            "Number of prompt tokens by source.",
            [*names, "source"],
            registry=registry,
        )
        self.prompt_tokens_by_source = {s: by_source.labels(*values, s) for s in PROMPT_SOURCES}
        self.prompt_tokens_cached = counter(
            vllm_metrics.PROMPT_TOKENS_CACHED, "Number of cached prompt tokens (local + external)."
        )
        self.generation_tokens = counter(
            vllm_metrics.GENERATION_TOKENS, "Number of generation tokens processed."
        )
        success = Counter(
            vllm_metrics.REQUEST_SUCCESS,
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=registry,
        )
        self.request_success = {
            r: success.labels(*values, r.value) for r in scheduling.FinishReason
        }

        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            vllm_metrics.REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            vllm_metrics.REQUEST_GENERATION_TOKENS,
            "Number of generation tokens processed.",
            token_buckets,
        )
        self.iteration_tokens = histogram(
            vllm_metrics.ITERATION_TOKENS_TOTAL,
            "Histogram of number of tokens per engine_step.",
            _ITERATION_TOKEN_BUCKETS,
        )
        self.request_max_num_generation_tokens = histogram(
            vllm_metrics.REQUEST_MAX_NUM_GENERATION_TOKENS,
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.request_params_n = histogram(
            vllm_metrics.REQUEST_PARAMS_N,
            "Histogram of the n request parameter.",
            (1, 2, 5, 10, 20),
        )
        self.request_params_max_tokens = histogram(
            vllm_metrics.REQUEST_PARAMS_MAX_TOKENS,
            "Histogram of the max_tokens request parameter.",
            token_buckets,
        )
        self.time_to_first_token = histogram(
            vllm_metrics.TIME_TO_FIRST_TOKEN_SECONDS,
            "Histogram of time to first token in seconds.",
            _TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            vllm_metrics.INTER_TOKEN_LATENCY_SECONDS,
            "Histogram of inter-token latency in seconds.",
            _ITL_BUCKETS,
        )
        self.request_time_per_output_token = histogram(
            vllm_metrics.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS,
            "Histogram of time_per_output_token_seconds per request.",
            _ITL_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            vllm_metrics.E2E_REQUEST_LATENCY_SECONDS,
            "Histogram of e2e request latency in seconds.",
            _REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            vllm_metrics.REQUEST_QUEUE_TIME_SECONDS,
            "Histogram of time spent in WAITING phase for request.",
            _REQUEST_LATENCY_BUCKETS,
        )
        self.request_inference_time = histogram(
            vllm_metrics.REQUEST_INFERENCE_TIME_SECONDS,
            "Histogram of time spent in RUNNING phase for request.",
            _REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = histogram(
            vllm_metrics.REQUEST_PREFILL_TIME_SECONDS,
            "Histogram of time spent in PREFILL phase for request.",
            _REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            vllm_metrics.REQUEST_DECODE_TIME_SECONDS,
            "Histogram of time spent in DECODE phase for request.",
            _REQUEST_LATENCY_BUCKETS,
        )

        self.nixl_xfer_time = histogram(
            vllm_metrics.NIXL_XFER_TIME_SECONDS,
            "Histogram of transfer duration for NIXL KV Cache transfers.",
            _NIXL_TIME_BUCKETS[1:],
        )
        self.nixl_post_time = histogram(
            vllm_metrics.NIXL_POST_TIME_SECONDS,
            "Histogram of transfer post time for NIXL KV Cache transfers.",
            _NIXL_TIME_BUCKETS,
        )
        self.nixl_bytes_transferred = histogram(
            vllm_metrics.NIXL_BYTES_TRANSFERRED,
            "Histogram of bytes transferred per NIXL KV Cache transfers.",
            _NIXL_BYTES_BUCKETS,
        )
        self.nixl_num_descriptors = histogram(
            vllm_metrics.NIXL_NUM_DESCRIPTORS,
            "Histogram of number of descriptors per NIXL KV Cache transfers.",
            _NIXL_DESCRIPTOR_BUCKETS,
        )
        self.nixl_num_failed_transfers = counter(
            vllm_metrics.NIXL_NUM_FAILED_TRANSFERS, "Number of failed NIXL KV Cache transfers."
        )
        self.nixl_num_failed_notifications = counter(
            vllm_metrics.NIXL_NUM_FAILED_NOTIFICATIONS,
            "Number of failed NIXL KV Cache notifications.",
        )
        self.nixl_num_kv_expired_reqs = counter(
            vllm_metrics.NIXL_NUM_KV_EXPIRED_REQS, "Number of requests that had their KV expire."
        )

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(self._export)

    def record(self, step: scheduling.Step, result: scheduling.StepResult) -> None:
        """Account for one engine step, as vLLM's stat logger does per iteration."""
        self.num_preemptions.inc(step.num_preemptions)
        self.iteration_tokens.observe(step.num_tokens)
        for token in result.tokens:
            self.generation_tokens.inc()
            if token.prompt is None:
                self.inter_token_latency.observe(token.since_last)
                continue
            self.time_to_first_token.observe(token.since_last)
            self._record_prompt(token.prompt)
        for finished in result.finished:
            self._record_finished(finished)

    def record_transfers(self, transfers: Iterable[scheduling.TransferDone]) -> None:
        for transfer in transfers:
            self.nixl_xfer_time.observe(transfer.duration)
            self.nixl_post_time.observe(0.0)  # an emulated transfer costs nothing to post
            self.nixl_bytes_transferred.observe(transfer.num_bytes)
            self.nixl_num_descriptors.observe(transfer.num_blocks * self._descriptors_per_block)

    def record_failed_transfer(self) -> None:
        self.nixl_num_failed_transfers.inc()

    def _record_prompt(self, prompt: scheduling.PromptSources) -> None:
        total = prompt.local_compute + prompt.external_kv_transfer - prompt.recomputed
        self.prompt_tokens.inc(total)
        self.prefix_cache_queries.inc(total)
        self.prompt_tokens_by_source["local_compute"].inc(prompt.local_compute)
        self.prompt_tokens_by_source["external_kv_transfer"].inc(prompt.external_kv_transfer)
        self.prompt_tokens_cached.inc(prompt.external_kv_transfer - prompt.recomputed)

    def _record_finished(self, f: scheduling.FinishedRequest) -> None:
        self.request_success[f.reason].inc()
        self.e2e_request_latency.observe(f.last_token - f.arrival)
        self.request_queue_time.observe(f.scheduled - f.arrival)
        self.request_prefill_time.observe(f.first_token - f.scheduled)
        self.request_decode_time.observe(f.last_token - f.first_token)
        self.request_inference_time.observe(f.last_token - f.scheduled)
        if f.generation_tokens > 1:
            tpot = (f.last_token - f.first_token) / (f.generation_tokens - 1)
            self.request_time_per_output_token.observe(tpot)
        self.request_prompt_tokens.observe(f.prompt_tokens)
        self.request_generation_tokens.observe(f.generation_tokens)
        self.request_max_num_generation_tokens.observe(f.max_tokens)
        self.request_params_n.observe(1)
        self.request_params_max_tokens.observe(f.max_tokens)


def family_names(text: str) -> Iterator[tuple[str, str]]:
    """``(family, type)`` of every family in a Prometheus text exposition, named as
    :data:`METRIC_NAMES` names them: compare a real vLLM scrape with
    ``dict(family_names(scrape))``."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        yield family.name, family.type

"""prometheus against a real Prometheus scraping vLLM-named metrics.

Targets are tiny prometheus_client exporters in this process (values set by the
test, so the expected signals are exact) and, in the last test, emulated vLLM
engines (``python -m tandem.workers.emulator``) under a little load.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from e2e.prometheus.conftest import PrometheusServer, Target, free_port
from tandem.autoscaling import planner, prometheus, signals

# vLLM v1's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip

SPEC = planner.PlannerSpec(
    ttft=0.5, tpot=0.05, prefill=planner.RoleBounds(1, 8), decode=planner.RoleBounds(1, 8),
    interval=1, scale_up_stabilization=2, scale_down_stabilization=10,
)  # fmt: skip
WINDOW, WARMUP = 10.0, 2.0

Start = Callable[[Sequence[Target]], PrometheusServer]


class Exporter:
    """One fake worker: vLLM metric names, values set by the test."""

    def __init__(self, *, kv: bool = True, latency: bool = True) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        r = self.registry
        self.waiting = Gauge("vllm:num_requests_waiting", "", labels, registry=r).labels("m", "0")
        Gauge("vllm:num_requests_running", "", labels, registry=r).labels("m", "0").set(1)
        self.kv = (
            Gauge("vllm:kv_cache_usage_perc", "", labels, registry=r).labels("m", "0")
            if kv
            else None
        )
        self.success = Counter("vllm:request_success", "", [*labels, "finished_reason"], registry=r)
        self.prompt = Counter("vllm:prompt_tokens", "", labels, registry=r).labels("m", "0")
        self.ttft = self.itl = None
        if latency:
            self.ttft = Histogram("vllm:time_to_first_token_seconds", "", labels, buckets=TTFT_BUCKETS,
                                  registry=r).labels("m", "0")  # fmt: skip
            self.itl = Histogram("vllm:inter_token_latency_seconds", "", labels, buckets=ITL_BUCKETS,
                                 registry=r).labels("m", "0")  # fmt: skip
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, "127.0.0.1", registry=r)

    def serve(self, n: int, ttft: float, itl: float, prompt_tokens: int = 1000) -> None:
        for _ in range(n):
            if self.ttft is not None and self.itl is not None:
                self.ttft.observe(ttft)
                self.itl.observe(itl)
            self.success.labels("m", "0", "length").inc()
            self.prompt.inc(prompt_tokens)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def exporters() -> Iterator[Callable[..., Exporter]]:
    made: list[Exporter] = []

    def make(**kwargs: bool) -> Exporter:
        made.append(Exporter(**kwargs))
        return made[-1]

    yield make
    for e in made:
        e.close()


def target(e: Exporter, role: str, pool: str = "p") -> Target:
    return Target(e.port, {"pool": pool, "role": role})


def read(prom: PrometheusServer, role: planner.Role, pool: str = "p", warmup: float = WARMUP,
         url: str | None = None) -> signals.Reading:  # fmt: skip
    source = prometheus.Source(prometheus.SourceSettings(url=url or prom.url, timeout=2))
    return asyncio.run(source.read(SPEC, pool, role, window=WINDOW, warmup=warmup))


def read_until(prom: PrometheusServer, role: planner.Role, ok: Callable[[signals.Reading], bool],
               feed: Callable[[], None] = lambda: None, timeout: float = 30,
               warmup: float = WARMUP) -> signals.Reading:  # fmt: skip
    deadline = time.monotonic() + timeout
    reading = read(prom, role, warmup=warmup)
    while not ok(reading):
        assert time.monotonic() < deadline, f"never got there: {reading}"
        feed()
        time.sleep(0.5)
        reading = read(prom, role, warmup=warmup)
    return reading


def metrics(reading: signals.Reading) -> planner.RoleMetrics:
    assert isinstance(reading.metrics, planner.RoleMetrics), reading.metrics
    return reading.metrics


def test_signals_of_both_roles(start_prometheus: Start, exporters: Callable[..., Exporter]) -> None:
    p, d1, d2 = exporters(), exporters(), exporters()
    p.waiting.set(6)
    d1.waiting.set(3)
    d2.waiting.set(4)
    assert d1.kv is not None
    assert d2.kv is not None
    d1.kv.set(0.9)
    d2.kv.set(1.0)
    prom = start_prometheus([target(p, "prefill"), target(d1, "decode"), target(d2, "decode")])

    def feed() -> None:
        p.serve(20, ttft=0.3, itl=0.02, prompt_tokens=2000)
        d1.serve(20, ttft=0.3, itl=0.06)
        d2.serve(20, ttft=0.3, itl=0.06)

    def complete(r: signals.Reading) -> bool:
        m = r.metrics
        return r.warm == r.targets > 0 and isinstance(m, planner.RoleMetrics) and m.ttft is not None

    prefill = read_until(prom, "prefill", complete, feed)
    decode = read_until(prom, "decode", lambda r: complete(r) and metrics(r).tpot is not None, feed)
    pm, dm = metrics(prefill), metrics(decode)
    assert (prefill.targets, decode.targets) == (1, 2)
    assert pm.queue_depth == 6
    assert pm.ttft is not None
    assert 0.25 < pm.ttft <= 0.5
    assert pm.prompt_token_rate is not None
    assert pm.prompt_token_rate > 0
    assert pm.request_rate is not None
    assert pm.request_rate > 0
    assert dm.queue_depth == 7
    assert dm.kv_usage == pytest.approx(0.95)
    assert dm.tpot is not None
    assert 0.05 < dm.tpot <= 0.075
    # Fed to the planner: decode is past its TPOT and KV targets, prefill within TTFT.
    inputs = planner.Inputs(decode=decode.inputs(2, 2), prefill=prefill.inputs(1, 1))
    plans = planner.run(SPEC, [(t, inputs) for t in (0.0, 1.0, 2.0)])
    assert plans[-1].decode.reason.startswith("decode 2→3: TPOT p90 ")
    assert plans[-1].decode.metrics_available


def test_young_targets_are_warming(
    start_prometheus: Start, exporters: Callable[..., Exporter]
) -> None:
    d = exporters()
    assert d.kv is not None
    d.kv.set(0.3)
    d.waiting.set(5)
    prom = start_prometheus([target(d, "decode")])
    prom.wait_for('up{role="decode"}', lambda r: len(r) == 1)
    d.serve(20, ttft=0.3, itl=0.06)
    reading = read_until(
        prom,
        "decode",
        lambda r: isinstance(r.metrics, planner.RoleMetrics) and r.metrics.kv_usage is not None,
        warmup=600,
    )
    assert (reading.targets, reading.warm) == (1, 0)
    # Load is read from every scraped worker; latency and queue from warm ones only.
    m = metrics(reading)
    assert m.kv_usage == pytest.approx(0.3)
    assert (m.tpot, m.ttft, m.queue_depth) == (None, None, 0)
    inputs = planner.Inputs(decode=reading.inputs(replicas=1, ready=1))
    plan = planner.decide(SPEC, inputs, planner.PlannerState(), 0.0)
    assert plan.decode.reason == (
        "decode holds at 1: 1 warming up, 0 starting: no signal from a warm worker yet"
    )


def test_missing_metric_is_unavailable(
    start_prometheus: Start, exporters: Callable[..., Exporter]
) -> None:
    d = exporters(kv=False)
    prom = start_prometheus([target(d, "decode")])
    prom.wait_for('up{role="decode"}', lambda r: len(r) == 1)
    reading = read(prom, "decode")
    assert reading.metrics == planner.MetricsUnavailable(
        "vllm:kv_cache_usage_perc not exposed by the decode workers"
    )


def test_no_worker_is_unavailable(
    start_prometheus: Start, exporters: Callable[..., Exporter]
) -> None:
    d = exporters()
    prom = start_prometheus([target(d, "decode")])
    prom.wait_for('up{role="decode"}', lambda r: len(r) == 1)
    reading = read(prom, "prefill", pool="other")
    assert isinstance(reading.metrics, planner.MetricsUnavailable)
    assert reading.metrics.reason.startswith("no prefill worker is scraped")


def test_prometheus_down_is_unavailable_and_the_planner_holds(
    start_prometheus: Start, exporters: Callable[..., Exporter]
) -> None:
    d = exporters()
    assert d.kv is not None
    d.kv.set(0.05)
    prom = start_prometheus([target(d, "decode")])
    reading = read_until(prom, "decode", lambda r: r.warm == 1)
    state = planner.PlannerState()
    for t in range(11):  # slack long enough for a scale-down
        plan = planner.decide(SPEC, planner.Inputs(decode=reading.inputs(5, 5)), state, float(t))
        state = plan.state
    assert plan.decode.action == "scale-down"
    prom.stop()
    down = read(prom, "decode")
    assert isinstance(down.metrics, planner.MetricsUnavailable)
    assert down.metrics.reason.startswith(f"Prometheus unreachable at {prom.url}")
    plan = planner.decide(SPEC, planner.Inputs(decode=down.inputs(4, 4)), state, 12.0)
    assert (plan.decode.replicas, plan.decode.metrics_available) == (4, False)
    assert plan.decode.reason.startswith(
        "decode holds at 4: metrics unavailable (Prometheus unreachable"
    )


@dataclass
class Emulator:
    port: int
    process: subprocess.Popen[bytes]


@pytest.fixture
def emulators(tmp_path: os.PathLike[str]) -> Iterator[Callable[[str], Emulator]]:
    started: list[Emulator] = []

    def start(role: str) -> Emulator:
        port = free_port()
        cmd = [sys.executable, "-m", "tandem.workers.emulator", "--role", role, "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
        with open(os.path.join(tmp_path, f"emulator-{port}.log"), "wb") as log:
            process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        started.append(Emulator(port, process))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, f"emulator exited with {process.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return started[-1]
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("emulator not ready in 30 s")

    yield start
    for e in started:
        e.process.terminate()
        try:
            e.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            e.process.kill()
            e.process.wait(timeout=10)


def test_emulated_engines(start_prometheus: Start, emulators: Callable[[str], Emulator]) -> None:
    prefill, decode = emulators("prefill"), emulators("decode")
    prom = start_prometheus([Target(prefill.port, {"pool": "p", "role": "prefill"}),
                             Target(decode.port, {"pool": "p", "role": "decode"})])  # fmt: skip
    model = httpx.get(f"http://127.0.0.1:{decode.port}/v1/models", timeout=5).json()["data"][0][
        "id"
    ]

    def feed() -> None:
        for e in (prefill, decode):
            body = {
                "model": model,
                "prompt": "hello " * 200,
                "max_tokens": 1 if e is prefill else 16,
            }
            httpx.post(
                f"http://127.0.0.1:{e.port}/v1/completions", json=body, timeout=30
            ).raise_for_status()

    def measured(r: signals.Reading) -> bool:
        m = r.metrics
        return r.warm == 1 and isinstance(m, planner.RoleMetrics) and m.ttft is not None

    p = metrics(read_until(prom, "prefill", measured, feed))
    d = metrics(
        read_until(prom, "decode", lambda r: measured(r) and metrics(r).tpot is not None, feed)
    )
    assert p.ttft is not None
    assert p.ttft < 0.5
    assert p.prompt_token_rate is not None
    assert p.prompt_token_rate > 0
    assert d.tpot is not None
    assert d.tpot < 0.05
    assert d.kv_usage is not None
    assert 0 <= d.kv_usage < 0.1
    assert d.request_rate is not None
    assert d.request_rate > 0

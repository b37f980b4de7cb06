"""Real vLLM workers for the e2e tests: a small P/D cluster and ways to talk to it.

The fixtures in conftest.py build a :class:`Cluster` with :func:`start_cluster`;
the tests use :func:`prefill_then_decode` (the router's two hops, by hand) and
:func:`scrape` / :func:`total` on the workers' ``/metrics``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tandem.workers import launcher, tinymodel, vllm_args

SERVED_NAME = "tiny"
STARTUP_TIMEOUT_S = 900.0
"""Generous: three servers booting at once on two cores; a boot is mostly
single-threaded imports in three processes (API server, engine core, worker),
~60 s of CPU each, and other jobs on the machine stretch that a lot."""
REQUEST_TIMEOUT_S = 120.0

MAIN_SHAPE = tinymodel.TinyShape()
OTHER_SHAPE = tinymodel.TinyShape(num_hidden_layers=3, num_key_value_heads=4)
"""The mismatched prefill model: another seed and another KV-cache shape."""

PREFILL_PARAMS: Mapping[str, Any] = {"do_remote_decode": True}
"""What the router sends with step (1): keep the KV blocks for a remote decode."""

_HOME_LEAKS = (".cache/vllm", ".config/vllm", ".cache/huggingface", ".cache/torch", ".triton")
_SHM_PREFIXES = ("psm_", "sem.mp-", "ucx", "nixl")


@dataclass(frozen=True)
class Models:
    main: Path
    other: Path


def build_models(root: Path) -> Models:
    return Models(
        main=tinymodel.cached_tiny_model(root, seed=0, shape=MAIN_SHAPE),
        other=tinymodel.cached_tiny_model(root, seed=1, shape=OTHER_SHAPE),
    )


@dataclass(frozen=True)
class Cluster:
    prefill: launcher.WorkerProcess
    """Also the greedy reference: a request without ``kv_transfer_params`` is plain
    aggregated serving, the connector stays out of it."""
    decode: launcher.WorkerProcess
    other_prefill: launcher.WorkerProcess
    """Serves ``Models.other`` under the same served name: a misconfigured pool."""

    @property
    def workers(self) -> tuple[launcher.WorkerProcess, ...]:
        return (self.prefill, self.decode, self.other_prefill)


def worker(
    run_root: Path, name: str, role: vllm_args.Role, model: Path, cpus: str
) -> launcher.WorkerProcess:
    engine = vllm_args.EngineArgs(
        model=str(model),
        served_name=SERVED_NAME,
        host="127.0.0.1",
        port=launcher.free_port(),
        max_model_len=512,
        max_num_seqs=8,
        dtype="float32",
        kv_buffer_device="cpu",
        enforce_eager=True,
    )
    settings = launcher.WorkerSettings(
        name=name,
        role=role,
        engine=engine,
        run_dir=run_root / name,
        cpus=cpus,
        startup_timeout_s=STARTUP_TIMEOUT_S,
    )
    return launcher.WorkerProcess(settings)


def plan_cluster(run_root: Path, models: Models) -> Cluster:
    # One core each for P and D, as a real pool gives each its own device. Every
    # worker computes on one core, so float sums run in the same order everywhere.
    return Cluster(
        prefill=worker(run_root, "prefill", "prefill", models.main, "0"),
        decode=worker(run_root, "decode", "decode", models.main, "1"),
        other_prefill=worker(run_root, "other-prefill", "prefill", models.other, "0"),
    )


# -- leaving nothing behind --------------------------------------------------


def leak_snapshot() -> dict[str, set[str]]:
    home, shm = Path.home(), Path("/dev/shm")
    return {
        "home": {leak for leak in _HOME_LEAKS if (home / leak).exists()},
        "shm": {p.name for p in shm.iterdir()} if shm.is_dir() else set(),
    }


def leftovers(cluster: Cluster, before: dict[str, set[str]]) -> list[str]:
    """What the stopped workers left: processes, listening ports, files in ``~``
    and shared memory that were not there before they started."""
    after = leak_snapshot()
    problems = []
    for w in cluster.workers:
        if w.pid is not None:
            try:
                os.killpg(w.pid, 0)
                problems.append(f"{w.settings.name}: process group {w.pid} still alive")
            except ProcessLookupError:
                pass
        ports = [w.settings.engine.port]
        if w.nixl_side_channel_port is not None:
            ports.append(w.nixl_side_channel_port)
        problems += [f"{w.settings.name}: port {p} still listening" for p in ports if _listening(p)]
    new_home = after["home"] - before["home"]
    if new_home:
        problems.append(f"written under ~: {sorted(new_home)}")
    new_shm = {n for n in after["shm"] - before["shm"] if n.startswith(_SHM_PREFIXES)}
    if new_shm:
        problems.append(f"left in /dev/shm: {sorted(new_shm)}")
    return problems


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- talking to the workers --------------------------------------------------


def post(worker: launcher.WorkerProcess, path: str, body: Mapping[str, Any]) -> httpx.Response:
    return httpx.post(worker.url + path, json=dict(body), timeout=REQUEST_TIMEOUT_S)


def reference(
    prefill: launcher.WorkerProcess, path: str, body: Mapping[str, Any]
) -> httpx.Response:
    """The aggregated greedy answer, computed from scratch by the prefill worker:
    no ``kv_transfer_params`` (plain serving) and a ``cache_salt`` of its own, so
    no KV block computed for an earlier P/D request is reused."""
    return post(prefill, path, {**body, "cache_salt": "aggregated-reference"})


def prefill_then_decode(
    prefill: launcher.WorkerProcess,
    decode: launcher.WorkerProcess,
    path: str,
    body: Mapping[str, Any],
) -> tuple[dict[str, Any], httpx.Response]:
    """The router's two hops: (1) the prompt to prefill with ``max_tokens: 1`` and
    ``do_remote_decode``; (2) the original request plus the returned
    ``kv_transfer_params`` to decode. Returns the prefill's JSON and the decode's
    response, unchecked (the negative test wants to see its error)."""
    first = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": dict(PREFILL_PARAMS)}
    first.pop("stream_options", None)
    response = post(prefill, path, first)
    response.raise_for_status()
    prefilled: dict[str, Any] = response.json()
    second = {**body, "kv_transfer_params": prefilled["kv_transfer_params"]}
    return prefilled, post(decode, path, second)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(worker: launcher.WorkerProcess) -> str:
    return httpx.get(worker.url + "/metrics", timeout=REQUEST_TIMEOUT_S).text


def scrape(worker: launcher.WorkerProcess) -> Samples:
    """Every sample of the worker's ``/metrics``, keyed by name and sorted labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(worker)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )

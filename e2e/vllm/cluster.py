"""Real vLLM workers for the e2e tests: a small P/D cluster and ways to talk to it.

The fixtures in conftest.py build a :class:`Cluster` with :func:`start_cluster`;
the tests use :func:`prefill_then_decode` (the router's two hops, by hand) and
:func:`scrape` / :func:`total` on the workers' ``/metrics``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tandem.router import app as router_app
from tandem.router import server as router_server
from tandem.router import settings as router_settings
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

GREEDY: Mapping[str, Any] = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
"""Sampling of every compared request: greedy, a fixed number of tokens."""


def completion_body(prompt: str) -> dict[str, Any]:
    """A greedy completion of ``prompt`` that returns its token ids."""
    return {"model": SERVED_NAME, "prompt": prompt, "return_token_ids": True, **GREEDY}


def chat_body(content: str) -> dict[str, Any]:
    """A greedy chat completion of one user message."""
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], **GREEDY}


PREFILL_PARAMS: Mapping[str, Any] = {"do_remote_decode": True}
"""What the router sends with step (1): keep the KV blocks for a remote decode."""

_HOME_LEAKS = (".cache/vllm", ".config/vllm", ".cache/huggingface", ".cache/torch", ".triton")


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
    home, shm = Path.home(), launcher.SHM_DIR
    return {
        "home": {leak for leak in _HOME_LEAKS if (home / leak).exists()},
        "shm": {p.name for p in shm.iterdir()} if shm.is_dir() else set(),
    }


def leftovers(cluster: Cluster, before: dict[str, set[str]]) -> list[str]:
    """What the stopped workers left: processes, listening ports, files in ``~``
    and shared memory that were not there before they started."""
    return workers_leftovers(cluster.workers, before)


def workers_leftovers(
    workers: Iterable[launcher.WorkerProcess], before: dict[str, set[str]]
) -> list[str]:
    """:func:`leftovers` for any set of workers."""
    after = leak_snapshot()
    problems = []
    for w in workers:
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
    new_shm = {n for n in after["shm"] - before["shm"] if n.startswith(launcher.SHM_PREFIXES)}
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


def warm_up(prefill: launcher.WorkerProcess, decode: launcher.WorkerProcess) -> bool:
    """The NIXL handshake of ``decode`` with ``prefill``, done by hand before any
    measured request. A decode worker meets a prefill engine over NIXL's side
    channel on the first request that names it, and vLLM waits at most 5 s for the
    reply; two busy cores can miss that (HTTP 500). One round, retried; False when
    no round succeeded."""
    body = completion_body("Warm up the NIXL handshake, please.")
    for _ in range(3):
        _, response = prefill_then_decode(prefill, decode, "/v1/completions", body)
        if response.status_code == 200:
            return True
        time.sleep(2)
    return False


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


def scrape_url(base_url: str) -> Samples:
    """:func:`scrape` for any ``/metrics`` (the router's)."""
    text = httpx.get(base_url + "/metrics", timeout=REQUEST_TIMEOUT_S).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def kill(worker: launcher.WorkerProcess) -> None:
    """A crash: SIGKILL to the worker's whole process group, then reaped, and the
    shared memory only its processes held removed, so that the leak checks see no
    debris (:meth:`~tandem.workers.launcher.WorkerProcess.kill_sync`). Only for a
    worker the caller started; the session's teardown then stops it as a no-op."""
    assert worker.pid is not None, f"{worker.settings.name} was never started"
    worker.kill_sync()


# -- the router, in a thread ---------------------------------------------------


class RouterThread:
    """The router (``tandem.router.server.serving``, uvicorn) in a thread with an
    event loop of its own, so that synchronous tests can talk to it over HTTP
    while blocking calls (killing a worker) run beside it. A context manager."""

    def __init__(self, config: router_settings.RouterSettings, start_timeout_s: float = 30.0):
        self.config = config
        self.url = ""
        self._start_timeout_s = start_timeout_s
        self._app: router_app.RouterApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-router", daemon=True)

    def __enter__(self) -> RouterThread:
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            raise TimeoutError(f"the router did not start in {self._start_timeout_s:.0f} s")
        if self._error is not None:
            raise RuntimeError("the router failed to start") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60.0)
        assert not self._thread.is_alive(), "the router thread did not stop in 60 s"
        if self._error is not None:
            raise RuntimeError("the router failed") from self._error

    def set_endpoints(self, role: router_settings.Role, urls: Iterable[str]) -> None:
        """``app.set_endpoints`` on the router's own event loop."""
        app, loop = self._app, self._loop
        if app is None or loop is None:
            raise RuntimeError("the router is not running")
        urls = list(urls)

        async def apply() -> None:
            app.set_endpoints(role, urls)

        asyncio.run_coroutine_threadsafe(apply(), loop).result(10.0)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ / __exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with router_server.serving(self.config, host="127.0.0.1", port=0) as (url, app):
            self.url, self._app = url, app
            self._ready.set()
            await self._stop.wait()

"""The autoscaler end to end: a real API server, a real Prometheus, emulated workers.

Every test here is marked ``k8s``, ``prometheus`` and ``e2e``. The session fixtures
``kubeconfig`` and ``prometheus_bin`` come from e2e/conftest.py, shared with the
other tiers (one control plane per session).

There is no kubelet: the :class:`Kubelet` here stands in for one. It watches the
pool's worker Pods, starts an engine emulator on 127.0.0.1 for each (its role
from the Pod's ``tandem.dev/role`` label), marks the Pod Ready once the emulator
answers ``/health`` (so the ReplicaSet and Deployment count it, as they would a
real one), publishes it as a Prometheus target with the labels ``pool``,
``role`` and ``namespace`` (a ``file_sd`` file, as Kubernetes service discovery
with the documented relabeling would), and stops the emulator (by its PID) when
the Pod goes. Pods that are not scheduled are deleted at once, so a scale-down
reaches it within a poll.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

__all__ = ["Kubelet", "Load", "Prometheus"]

HERE = Path(__file__).resolve().parent
SCRAPE_INTERVAL = 1.0
LABEL_POOL = "tandem.dev/pool"
LABEL_ROLE = "tandem.dev/role"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.k8s)
            item.add_marker(pytest.mark.prometheus)
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a child we started, by its PID."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


# ---------------------------------------------------------------------------
# Prometheus with file-based service discovery


class Prometheus:
    """A Prometheus on 127.0.0.1 whose targets follow :meth:`set_targets`; it can be
    stopped and started again on the same port (with empty storage)."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets_file = root / "targets.json"
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        root.mkdir(parents=True, exist_ok=True)
        self.set_targets([])
        (root / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {SCRAPE_INTERVAL:g}s\n"
            f"  evaluation_interval: {SCRAPE_INTERVAL:g}s\n"
            "scrape_configs:\n  - job_name: workers\n    file_sd_configs:\n"
            f"      - files: ['{self.targets_file}']\n        refresh_interval: 1s\n"
        )

    def set_targets(self, targets: Sequence[tuple[int, Mapping[str, str]]]) -> None:
        body = [
            {"targets": [f"127.0.0.1:{port}"], "labels": dict(labels)} for port, labels in targets
        ]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(self.targets_file)  # atomic: Prometheus never reads half a file

    def start(self) -> None:
        data = self.root / f"data-{self._starts}"
        data.mkdir()
        log = self.root / f"prometheus-{self._starts}.log"
        self._starts += 1
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"Prometheus exited:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        pytest.fail(f"Prometheus not ready in 30 s:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)

    def query(self, promql: str) -> float | None:
        """An instant query's single value; None when empty, NaN or unreachable."""
        try:
            body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=2)
            result = body.json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if value != value else value  # NaN


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    server = Prometheus(prometheus_bin, tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# A stand-in kubelet


@dataclass
class Worker:
    pod: str
    role: str
    port: int
    process: subprocess.Popen[bytes]
    ready: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Kubelet:
    """Runs an emulator per worker Pod of one pool (see the module docstring)."""

    kubeconfig: Path
    namespace: str
    pool: str
    prometheus: Prometheus
    workdir: Path
    emulator_args: Mapping[str, Sequence[str]]
    """Extra emulator arguments per role."""
    workers: dict[str, Worker] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)

    def __post_init__(self) -> None:
        from kubernetes import client, config

        api = config.new_client_from_config(str(self.kubeconfig))  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._turn = itertools.count()
        self._http = httpx.Client(timeout=0.5)
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:
                self.errors.append(repr(exc))
            self._stop.wait(0.3)

    def sync(self) -> None:
        pods = self.core.list_namespaced_pod(  # the workers: not the router
            self.namespace, label_selector=f"{LABEL_POOL}={self.pool},{LABEL_ROLE}"
        ).items
        live = {p.metadata.name: p for p in pods if not p.metadata.deletion_timestamp}
        for name in [n for n in self.workers if n not in live]:
            with self._lock:
                gone = self.workers.pop(name)
            self._publish()
            _stop(gone.process)
        for name, pod in live.items():
            worker = self.workers.get(name)
            if worker is None:
                worker = self._start(name, pod.metadata.labels[LABEL_ROLE])
                with self._lock:
                    self.workers[name] = worker
            if not worker.ready and self._healthy(worker):
                self.core.patch_namespaced_pod_status(name, self.namespace, {"status": {
                    "phase": "Running", "podIP": "127.0.0.1",
                    "conditions": [{"type": t, "status": "True"}
                                   for t in ("PodScheduled", "Initialized", "ContainersReady",
                                             "Ready")],
                }})  # fmt: skip
                worker.ready = True
                self._publish()

    def _start(self, pod: str, role: str) -> Worker:
        port = free_port()
        log = self.workdir / f"{pod}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tandem.workers.emulator", "--role", role,
                 "--port", str(port), "--log-level", "warning", *self.emulator_args.get(role, ())],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir,  # not the repo root
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            )  # fmt: skip
        return Worker(pod, role, port, process)

    def _healthy(self, worker: Worker) -> bool:
        if worker.process.poll() is not None:
            raise RuntimeError(f"emulator of {worker.pod} exited with {worker.process.returncode}")
        try:
            return self._http.get(worker.url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    def _publish(self) -> None:
        with self._lock:
            targets = [
                (w.port, {"pool": self.pool, "role": w.role, "namespace": self.namespace})
                for w in self.workers.values()
                if w.ready
            ]
        self.prometheus.set_targets(targets)

    def urls(self, role: str) -> list[str]:
        with self._lock:
            return [w.url for w in self.workers.values() if w.ready and w.role == role]

    def pick(self, role: str) -> str | None:
        urls = self.urls(role)
        return urls[next(self._turn) % len(urls)] if urls else None

    def replicas(self, deployment: str) -> int:
        d = self.apps.read_namespaced_deployment(deployment, self.namespace)
        return int(d.spec.replicas)

    def pool_object(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            "tandem.dev", "v1alpha1", self.namespace, "inferencepools", self.pool
        )
        return obj

    def events(self) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={self.pool}"
        ).items
        return [(e.reason, e.message) for e in items]

    def close(self) -> None:
        for load in self.loads:
            load.stop()
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            workers, self.workers = list(self.workers.values()), {}
        for w in workers:
            _stop(w.process)
        for load in self.loads:
            load.join()  # their requests fail fast now
        self._http.close()


# ---------------------------------------------------------------------------
# Load: clients doing what the router does (prefill hop, then decode hop)

PREFILL_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
              "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip


class Load:
    """``streams`` closed-loop clients, each sending one request after another:
    ``prompt_tokens`` prefilled on a prefill worker (1 token, KV kept), then
    ``max_tokens`` generated on a decode worker with the prefill's KV parameters,
    workers picked round-robin among the ready ones."""

    def __init__(
        self, kubelet: Kubelet, model: str, streams: int, prompt_tokens: int, max_tokens: int
    ) -> None:
        self.kubelet = kubelet
        self.model = model
        self.prompt = [7] * prompt_tokens
        self.max_tokens = max_tokens
        self.done = 0
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            for i in range(streams)
        ]
        for t in self._threads:
            t.start()
        kubelet.loads.append(self)

    def _client(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                prefill, decode = self.kubelet.pick("prefill"), self.kubelet.pick("decode")
                if prefill is None or decode is None:
                    self._stop.wait(0.2)
                    continue
                try:
                    first = http.post(prefill + "/v1/completions", json={
                        "model": self.model, "prompt": self.prompt, "max_tokens": 1,
                        "kv_transfer_params": PREFILL_KV,
                    })  # fmt: skip
                    first.raise_for_status()
                    params = first.json().get("kv_transfer_params")
                    http.post(decode + "/v1/completions", json={
                        "model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                        "kv_transfer_params": params,
                    }).raise_for_status()  # fmt: skip
                    self.done += 1
                except (httpx.HTTPError, ValueError):
                    # A worker removed by a scale-down, mid-request: a router would retry.
                    self.failed += 1
                    self._stop.wait(0.1)

    def stop(self) -> None:
        """No new requests; those in flight finish in the background."""
        self._stop.set()

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=150)

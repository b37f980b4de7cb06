"""A real Prometheus for the tests under e2e/prometheus (all marked ``prometheus``).

``prometheus_bin`` finds the server (``TANDEM_PROMETHEUS`` naming a binary, else
``prometheus`` on PATH, else the Debian package's ``/usr/bin/prometheus``); when
none is there and we are root on a Debian-like system it installs the Debian
package. Missing and not installable fails the tests loudly;
``TANDEM_SKIP_PROMETHEUS=1`` skips them instead.

``start_prometheus(targets)`` starts one as a child process on 127.0.0.1 (a free
port, a temp config and data dir, scraping every second) and stops it at the
end of the test.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
SCRAPE_INTERVAL = 1.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.prometheus)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Target:
    """A scrape target and the target labels Prometheus attaches to it."""

    port: int
    labels: Mapping[str, str]


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def wait_for(
        self, query: str, check: Callable[[list[dict[str, object]]], bool], timeout: float = 20
    ) -> list[dict[str, object]]:
        """Poll an instant query until ``check`` accepts its result."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            body = httpx.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=5).json()
            result = body["data"]["result"]
            if check(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{query!r} never satisfied the check; last result {result}")


def _config(targets: Sequence[Target]) -> str:
    lines = [
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL:g}s",
        f"  evaluation_interval: {SCRAPE_INTERVAL:g}s",
        "scrape_configs:",
        "  - job_name: workers",
        "    static_configs:",
    ]
    for t in targets:
        lines.append(f"      - targets: ['127.0.0.1:{t.port}']")
        lines.append("        labels:")
        lines.extend(f"          {k}: '{v}'" for k, v in t.labels.items())
    return "\n".join(lines) + "\n"


@pytest.fixture
def start_prometheus(
    prometheus_bin: str, tmp_path: Path
) -> Iterator[Callable[[Sequence[Target]], PrometheusServer]]:
    started: list[PrometheusServer] = []

    def start(targets: Sequence[Target]) -> PrometheusServer:
        root = tmp_path / f"prometheus-{len(started)}"
        (root / "data").mkdir(parents=True)
        config = root / "prometheus.yml"
        config.write_text(_config(targets))
        port = free_port()
        log = root / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
                 "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log)
        started.append(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(
                    f"Prometheus exited with {process.returncode}:\n{log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"Prometheus not ready in 30 s:\n{log.read_text()[-2000:]}")

    yield start
    for server in started:
        server.stop()

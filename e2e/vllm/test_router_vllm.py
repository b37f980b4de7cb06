"""The router in front of real vLLM workers (CPU) with the KV cache moved by NIXL.

A module of its own workers, so that killing them leaves the session's
``vllm_cluster`` alone: ``prefill-a`` and ``decode`` start here; the session's
prefill worker is the second prefill worker of the pool (and, as elsewhere, the
aggregated greedy reference), which saves a boot. The router runs in a thread
(``cluster.RouterThread``) in mode ``disaggregated``, policy ``round-robin``
(so a dead prefill worker is certainly tried), and the tests talk to it over
HTTP. The destructive tests come last, in this order: prefill ``prefill-a``
killed, then the decode worker killed in the middle of a stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from e2e.vllm import cluster
from e2e.vllm.cluster import SERVED_NAME, Samples, total
from tandem.router import settings
from tandem.workers import launcher

# Two more vLLM workers on top of the session's three: on a 2-core machine their start
# alone exceeded the startup limit in CI, so this module runs on request (-m slow).
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = (
    "A router stands in front of two pools of workers. It sends each prompt to a prefill "
    "worker first, then the whole request to a decode worker, which pulls the key and value "
    "blocks over NIXL and streams the answer back through the router to the client. "
) * 3
"""About 150 tokens: more than one KV block of the CPU backend."""

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
COMPLETION: dict[str, Any] = {
    "model": SERVED_NAME, "prompt": PROMPT, "return_token_ids": True, **GREEDY
}  # fmt: skip
CHAT: dict[str, Any] = {
    "model": SERVED_NAME,
    "messages": [{"role": "user", "content": "Tell me how a router finds a decode worker."}],
    **GREEDY,
}
STREAM: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

EXTERNAL = {"source": "external_kv_transfer"}
BY_SOURCE = "vllm:prompt_tokens_by_source_total"
POOL = "router-e2e"

CLIENT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
"""Every client call is bounded; the router's own timeouts are shorter."""


@dataclass(frozen=True)
class RoutedPool:
    router: cluster.RouterThread
    prefill_a: launcher.WorkerProcess
    """Started here: the prefill worker the prefill test kills."""
    prefill_b: launcher.WorkerProcess
    """The session's prefill worker: survives, and gives the reference."""
    decode: launcher.WorkerProcess
    """Started here: the decode worker the last test kills."""


@pytest.fixture(scope="module")
def pool(
    vllm_cluster: cluster.Cluster,
    tiny_models: cluster.Models,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RoutedPool]:
    run_root = tmp_path_factory.mktemp("router-vllm")
    prefill_a = cluster.worker(run_root, "prefill-a", "prefill", tiny_models.main, "0")
    decode = cluster.worker(run_root, "router-decode", "decode", tiny_models.main, "1")
    mine = (prefill_a, decode)
    before = cluster.leak_snapshot()
    started = time.monotonic()
    launcher.start_all_sync(mine)
    print(f"\nrouter test workers ready in {time.monotonic() - started:.0f} s")
    try:
        prefill_b = vllm_cluster.prefill
        for prefill in (prefill_a, prefill_b):
            _warm_up(prefill, decode)
        config = settings.static_settings(
            SERVED_NAME,
            prefill=[prefill_a.url, prefill_b.url],
            decode=[decode.url],
            mode="disaggregated",
            policy="round-robin",
            poolName=POOL,
            endpointCooldown=60.0,
            timeouts={"connect": 3.0, "prefill": 60.0, "firstByte": 60.0, "idle": 30.0},
        )
        with cluster.RouterThread(config) as router:
            yield RoutedPool(router, prefill_a, prefill_b, decode)
    finally:
        launcher.stop_all_sync(mine)
    problems = cluster.workers_leftovers(mine, before)
    assert not problems, "the router test's workers left things behind: " + "; ".join(problems)


def _warm_up(prefill: launcher.WorkerProcess, decode: launcher.WorkerProcess) -> None:
    """The NIXL handshake of ``decode`` with ``prefill``, done by hand before the
    router sees them: vLLM waits at most 5 s for it, which two busy cores can miss
    (HTTP 500), so one round, retried, keeps it out of the measured requests."""
    body = {**COMPLETION, "prompt": "Warm up the NIXL handshake, please."}
    for _ in range(3):
        _, response = cluster.prefill_then_decode(prefill, decode, "/v1/completions", body)
        if response.status_code == 200:
            return
        time.sleep(2)
    pytest.fail(f"no P/D round {prefill.settings.name} → decode:\n{decode.log_tail(60)}")


# -- helpers -------------------------------------------------------------------


def _events(lines: Iterator[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def _stream(router: cluster.RouterThread, path: str, body: dict[str, Any]) -> list[str]:
    """The data of every SSE event of a streamed answer through the router."""
    with httpx.stream("POST", router.url + path, json=body, timeout=CLIENT_TIMEOUT) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        return _events(response.iter_lines())


def _chunks(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    return chunks


def _completion(events: list[str]) -> tuple[str, list[int], dict[str, Any]]:
    """Text, token ids and usage of a streamed completion."""
    chunks = _chunks(events)
    choices = [choice for chunk in chunks for choice in chunk["choices"]]
    text = "".join(choice["text"] for choice in choices)
    token_ids = [t for choice in choices for t in choice.get("token_ids") or ()]
    return text, token_ids, chunks[-1]["usage"]


def _router_metrics(pool: RoutedPool) -> Samples:
    return cluster.scrape_url(pool.router.url)


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def _external_tokens_after(
    decode: launcher.WorkerProcess, before: Samples, at_least: float
) -> float:
    """Prompt tokens the decode worker got over NIXL since ``before``, once vLLM
    published them (its engine stats come a little after the response)."""
    deadline = time.monotonic() + 30.0
    while True:
        got = _delta(cluster.scrape(decode), before, BY_SOURCE, **EXTERNAL)
        if got >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def _reference_completion(pool: RoutedPool) -> dict[str, Any]:
    ref = cluster.reference(pool.prefill_b, "/v1/completions", COMPLETION)
    assert ref.status_code == 200, ref.text
    choice: dict[str, Any] = ref.json()["choices"][0]
    assert len(choice["token_ids"]) == GREEDY["max_tokens"]
    return choice


# -- through the router, healthy -------------------------------------------------


def test_streamed_chat_through_the_router_equals_the_reference(pool: RoutedPool) -> None:
    ref = cluster.reference(pool.prefill_b, "/v1/chat/completions", CHAT)
    assert ref.status_code == 200, ref.text
    want = ref.json()
    router_before, decode_before = _router_metrics(pool), cluster.scrape(pool.decode)

    chunks = _chunks(_stream(pool.router, "/v1/chat/completions", {**CHAT, **STREAM}))
    content = "".join(
        choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"]
    )
    assert content == want["choices"][0]["message"]["content"]
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == want["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == GREEDY["max_tokens"]

    # Both hops happened: the router went through the prefill pool, and the decode
    # worker got the prompt's KV over NIXL instead of computing it.
    after = _router_metrics(pool)
    assert _delta(after, router_before, "tandem_router_routed_total", path="disaggregated") == 1
    assert _delta(after, router_before, "tandem_router_requests_total", outcome="ok") == 1
    prompt_tokens = usage["prompt_tokens"]
    assert _external_tokens_after(pool.decode, decode_before, prompt_tokens - 1) >= (
        prompt_tokens - 1
    )


def test_streamed_completion_through_the_router_equals_the_reference(pool: RoutedPool) -> None:
    expected = _reference_completion(pool)
    for salt in ("first", "second"):  # round-robin: once through each prefill worker
        # A salt of its own, or the decode worker's prefix cache holds the prompt.
        body = {**COMPLETION, **STREAM, "cache_salt": f"router-{salt}"}
        decode_before = cluster.scrape(pool.decode)
        text, token_ids, usage = _completion(_stream(pool.router, "/v1/completions", body))
        assert token_ids == expected["token_ids"]
        assert text == expected["text"]
        prompt_tokens = usage["prompt_tokens"]
        assert prompt_tokens > 128  # several KV blocks
        external = _external_tokens_after(pool.decode, decode_before, prompt_tokens - 1)
        assert external >= prompt_tokens - 1


# -- faults (destructive: last, in this order) ---------------------------------------


def test_a_killed_prefill_worker_is_retried_then_prefilled_on_decode(pool: RoutedPool) -> None:
    expected = _reference_completion(pool)
    dead = pool.prefill_a.url
    cluster.kill(pool.prefill_a)
    before = _router_metrics(pool)

    # Round-robin over [dead, alive]: within two requests one tries the dead worker
    # first, fails to connect, and is retried on the other one (which then keeps
    # the dead worker in its cooldown).
    for _ in range(2):
        text, token_ids, _ = _completion(
            _stream(pool.router, "/v1/completions", {**COMPLETION, **STREAM})
        )
        assert (text, token_ids) == (expected["text"], expected["token_ids"])
    after = _router_metrics(pool)
    assert _delta(after, before, "tandem_router_retries_total", role="prefill") == 1
    assert _delta(after, before, "tandem_router_upstream_errors_total", role="prefill") == 1
    assert _delta(after, before, "tandem_router_routed_total", path="disaggregated") == 2
    assert _delta(after, before, "tandem_router_fallbacks_total") == 0

    # Only the dead worker left in the prefill pool: it is tried (all cooling down:
    # offered anyway), fails, no other is left, and the decode worker prefills.
    pool.router.set_endpoints("prefill", [dead])
    try:
        before = after
        decode_before = cluster.scrape(pool.decode)
        text, token_ids, usage = _completion(
            _stream(pool.router, "/v1/completions", {**COMPLETION, **STREAM})
        )
        assert (text, token_ids) == (expected["text"], expected["token_ids"])
        after = _router_metrics(pool)
        assert _delta(after, before, "tandem_router_fallbacks_total", reason="prefill_failed") == 1
        assert _delta(after, before, "tandem_router_routed_total", path="fallback") == 1
        assert _delta(after, before, "tandem_router_upstream_errors_total", role="prefill") == 1
        assert _delta(after, before, "tandem_router_requests_total", outcome="ok") == 1
        # Prefilled locally this time: nothing came over NIXL.
        time.sleep(2.0)
        assert _delta(cluster.scrape(pool.decode), decode_before, BY_SOURCE, **EXTERNAL) == 0
        assert usage["prompt_tokens"] > 128
    finally:
        pool.router.set_endpoints("prefill", [pool.prefill_b.url])


def test_a_decode_worker_killed_mid_stream_ends_the_stream_cleanly(pool: RoutedPool) -> None:
    pool.router.set_endpoints("prefill", [pool.prefill_b.url])
    before = _router_metrics(pool)
    body = {**CHAT, **STREAM, "max_tokens": 400}
    events: list[str] = []
    started = time.monotonic()
    with httpx.stream(
        "POST", pool.router.url + "/v1/chat/completions", json=body, timeout=CLIENT_TIMEOUT
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
                if len(events) == 3:
                    break
        killed = time.monotonic()
        cluster.kill(pool.decode)
        events += _events(lines)
    ended = time.monotonic()
    print(f"\nstream: {ended - started:.1f} s, ended {ended - killed:.1f} s after the kill")

    assert ended - killed < 30.0
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["message"]
    assert error["type"]
    tokens = [json.loads(e) for e in events[:-2]]
    assert not [t for t in tokens if "error" in t]
    # The stream was cut: far fewer than the 400 tokens asked for.
    assert len(tokens) < 400
    after = _router_metrics(pool)
    assert _delta(after, before, "tandem_router_requests_total", outcome="broken_stream") == 1

    # The router stays up and answers the next request at once with an error.
    health = httpx.get(pool.router.url + "/health", timeout=5.0)
    assert health.status_code == 200
    started = time.monotonic()
    response = httpx.post(
        pool.router.url + "/v1/chat/completions", json=CHAT, timeout=CLIENT_TIMEOUT
    )
    elapsed = time.monotonic() - started
    assert response.status_code >= 500, response.text
    assert response.json()["error"]["message"]
    assert elapsed < 30.0
    after, before = _router_metrics(pool), after
    assert _delta(after, before, "tandem_router_upstream_errors_total", role="decode") >= 1
    assert _delta(after, before, "tandem_router_requests_total", outcome="ok") == 0

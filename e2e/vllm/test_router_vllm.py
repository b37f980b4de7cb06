"""The router in front of real vLLM workers (CPU) with the KV cache moved by NIXL.

No workers of its own: the router fronts the session's ``vllm_cluster``, its
``prefill`` worker (also, as elsewhere, the aggregated greedy reference) and its
``decode`` worker. It runs in a thread (``cluster.RouterThread``) in mode
``disaggregated``, policy ``round-robin``, and the tests talk to it over HTTP.

Every reference is computed up front (the ``references`` fixture, set up with the
router), before any worker dies. The destructive tests are marked
``kills_vllm_workers``: conftest.py moves them to the very end of the session,
after every other test of the cluster, in this order: ``other_prefill`` killed
(a dead prefill endpoint: retried), then ``prefill`` too (only dead prefill
workers: the decode worker prefills), then the decode worker killed in the middle
of a stream. The session's teardown stops the killed workers as a no-op.
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
from e2e.vllm.cluster import GREEDY, SERVED_NAME, Samples, total
from tandem.router import settings
from tandem.workers import launcher

pytestmark = pytest.mark.vllm

PROMPT = (
    "A router stands in front of two pools of workers. It sends each prompt to a prefill "
    "worker first, then the whole request to a decode worker, which pulls the key and value "
    "blocks over NIXL and streams the answer back through the router to the client. "
) * 3
"""About 150 tokens: more than one KV block of the CPU backend."""

COMPLETION = cluster.completion_body(PROMPT)
CHAT = cluster.chat_body("Tell me how a router finds a decode worker.")
STREAM: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

EXTERNAL = {"source": "external_kv_transfer"}
BY_SOURCE = "vllm:prompt_tokens_by_source_total"
POOL = "router-e2e"

CLIENT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
"""Every client call is bounded; the router's own timeouts are shorter."""


@dataclass(frozen=True)
class References:
    """The aggregated greedy answers (the prefill worker, plain serving), taken
    while every worker is alive."""

    chat: dict[str, Any]
    completion: dict[str, Any]
    """The completion's only choice: ``text`` and ``token_ids``."""


@dataclass(frozen=True)
class RoutedPool:
    router: cluster.RouterThread
    prefill: launcher.WorkerProcess
    """The session's prefill worker: the router's prefill pool."""
    other_prefill: launcher.WorkerProcess
    """The session's worker of another model: killed first, then a dead prefill
    endpoint in the pool."""
    decode: launcher.WorkerProcess
    """The session's decode worker: killed by the last test."""
    references: References


@pytest.fixture(scope="module")
def references(vllm_cluster: cluster.Cluster) -> References:
    chat = cluster.reference(vllm_cluster.prefill, "/v1/chat/completions", CHAT)
    assert chat.status_code == 200, chat.text
    completion = cluster.reference(vllm_cluster.prefill, "/v1/completions", COMPLETION)
    assert completion.status_code == 200, completion.text
    choice: dict[str, Any] = completion.json()["choices"][0]
    assert len(choice["token_ids"]) == GREEDY["max_tokens"]
    return References(chat=chat.json(), completion=choice)


@pytest.fixture(scope="module")
def pool(vllm_cluster: cluster.Cluster, references: References) -> Iterator[RoutedPool]:
    """The router over the session's workers; ``references`` are taken first."""
    prefill, decode = vllm_cluster.prefill, vllm_cluster.decode
    _warm_up(prefill, decode)
    config = settings.static_settings(
        SERVED_NAME,
        prefill=[prefill.url],
        decode=[decode.url],
        mode="disaggregated",
        policy="round-robin",
        poolName=POOL,
        endpointCooldown=60.0,
        timeouts={"connect": 3.0, "prefill": 60.0, "firstByte": 60.0, "idle": 30.0},
    )
    with cluster.RouterThread(config) as router:
        yield RoutedPool(router, prefill, vllm_cluster.other_prefill, decode, references)


def _warm_up(prefill: launcher.WorkerProcess, decode: launcher.WorkerProcess) -> None:
    """:func:`cluster.warm_up` before the router sees them (already done when
    test_pd_nixl.py ran)."""
    if not cluster.warm_up(prefill, decode):
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


# -- through the router, healthy -------------------------------------------------


def test_streamed_chat_through_the_router_equals_the_reference(pool: RoutedPool) -> None:
    want = pool.references.chat
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
    expected = pool.references.completion
    for salt in ("first", "second"):  # twice: each round moves the whole prompt again
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


# -- faults (destructive: moved to the end of the session, in this order) ---------------


@pytest.mark.kills_vllm_workers
def test_a_killed_prefill_worker_is_retried_then_prefilled_on_decode(pool: RoutedPool) -> None:
    expected = pool.references.completion
    # other_prefill serves another model: dead, it is just a prefill endpoint that
    # refuses connections, first in the pool.
    cluster.kill(pool.other_prefill)
    pool.router.set_endpoints("prefill", [pool.other_prefill.url, pool.prefill.url])
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

    # The last prefill worker dies too: both in the pool are dead. The live-looking
    # one is tried, fails, the retry goes to the one cooling down (all are: offered
    # anyway), fails, and the decode worker prefills the prompt itself.
    cluster.kill(pool.prefill)
    before = after
    decode_before = cluster.scrape(pool.decode)
    # A salt of its own: the decode worker computes the whole prompt (no prefix
    # cache hit from the rounds above).
    body = {**COMPLETION, **STREAM, "cache_salt": "router-fallback"}
    text, token_ids, usage = _completion(_stream(pool.router, "/v1/completions", body))
    assert (text, token_ids) == (expected["text"], expected["token_ids"])
    after = _router_metrics(pool)
    assert _delta(after, before, "tandem_router_fallbacks_total", reason="prefill_failed") == 1
    assert _delta(after, before, "tandem_router_routed_total", path="fallback") == 1
    assert _delta(after, before, "tandem_router_retries_total", role="prefill") == 1
    assert _delta(after, before, "tandem_router_upstream_errors_total", role="prefill") == 2
    assert _delta(after, before, "tandem_router_requests_total", outcome="ok") == 1
    # Prefilled locally this time: nothing came over NIXL.
    time.sleep(2.0)
    assert _delta(cluster.scrape(pool.decode), decode_before, BY_SOURCE, **EXTERNAL) == 0
    assert usage["prompt_tokens"] > 128


@pytest.mark.kills_vllm_workers
def test_a_decode_worker_killed_mid_stream_ends_the_stream_cleanly(pool: RoutedPool) -> None:
    # No prefill worker left alive (the test above): an empty pool, so the decode
    # worker prefills at once and streams.
    pool.router.set_endpoints("prefill", [])
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
    assert _delta(after, before, "tandem_router_routed_total", path="fallback") == 1

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

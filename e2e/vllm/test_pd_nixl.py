"""Disaggregated prefill/decode on real vLLM (CPU) with the KV cache moved by NIXL.

The router's two hops, done by hand: the prompt goes to the prefill worker with
``max_tokens: 1`` and ``kv_transfer_params: {do_remote_decode: true}``; the
original request goes to the decode worker with the ``kv_transfer_params`` the
prefill returned, and the decode worker pulls the prompt's KV blocks over NIXL
(UCX, DRAM to DRAM) instead of computing them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from e2e.vllm.cluster import (
    GREEDY,
    MAIN_SHAPE,
    OTHER_SHAPE,
    Cluster,
    Samples,
    chat_body,
    completion_body,
    prefill_then_decode,
    reference,
    scrape,
    scrape_text,
    total,
    warm_up,
)
from tandem.workers import launcher, tinymodel

pytestmark = pytest.mark.vllm

PROMPT = (
    "The router sends the prompt to a prefill worker, then the request to a decode worker. "
    "The decode worker pulls the key and value blocks from the prefill worker with NIXL. "
    "Prefill reads the whole prompt at once; decode makes one token per step. "
) * 3
"""About 200 tokens: more than one KV block of the CPU backend (128 tokens)."""

COMPLETION = completion_body(PROMPT)
CHAT = chat_body("Tell me a story about a small robot.")

EXTERNAL = {"source": "external_kv_transfer"}
FAILED = "vllm:nixl_num_failed_transfers_total"
BYTES = "vllm:nixl_bytes_transferred_sum"
BY_SOURCE = "vllm:prompt_tokens_by_source_total"


def _bytes_per_token(shape: tinymodel.TinyShape) -> int:
    """K and V of every layer, float32."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * 4


def _metrics_after(
    worker: launcher.WorkerProcess,
    before: Samples,
    ready: Callable[[Callable[..., float]], bool],
    timeout_s: float = 30.0,
) -> Callable[..., float]:
    """Scrape until ``ready(delta)`` holds (vLLM publishes engine stats a little
    after the response), then return ``delta(name, **labels)`` against ``before``."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = scrape(worker)

        def delta(name: str, after: Samples = after, **labels: str) -> float:
            return total(after, name, **labels) - total(before, name, **labels)

        if ready(delta) or time.monotonic() > deadline:
            return delta
        time.sleep(0.5)


def _log_since(worker: launcher.WorkerProcess, offset: int, needle: str) -> str:
    """The worker's log written after ``offset``, once it mentions ``needle``."""
    deadline = time.monotonic() + 15.0
    while True:
        with worker.log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.fixture(scope="module")
def pd(vllm_cluster: Cluster) -> Cluster:
    """The cluster once decode has shaken hands with prefill (:func:`warm_up`)."""
    c = vllm_cluster
    if not warm_up(c.prefill, c.decode):
        pytest.fail(f"no P/D round succeeded; decode log:\n{c.decode.log_tail(60)}")
    return c


def test_decode_output_equals_aggregated_reference(pd: Cluster) -> None:
    ref = reference(pd.prefill, "/v1/completions", COMPLETION)
    assert ref.status_code == 200, ref.text
    expected = ref.json()["choices"][0]

    before = scrape(pd.decode)
    prefilled, response = prefill_then_decode(pd.prefill, pd.decode, "/v1/completions", COMPLETION)
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]

    assert choice["token_ids"] == expected["token_ids"]
    assert choice["text"] == expected["text"]
    assert len(choice["token_ids"]) == GREEDY["max_tokens"]
    # The prefill's one token is the first token of the answer.
    assert prefilled["choices"][0]["token_ids"] == expected["token_ids"][:1]
    # The prompt spans several KV blocks, so block order matters.
    assert len(prefilled["kv_transfer_params"]["remote_block_ids"][0]) > 1

    # The prompt's KV came over NIXL, not from the decode worker's own compute.
    prompt_tokens = answer["usage"]["prompt_tokens"]
    delta = _metrics_after(
        pd.decode, before, lambda d: d(BYTES) > 0 and d(BY_SOURCE, **EXTERNAL) > 0
    )
    external = delta(BY_SOURCE, **EXTERNAL)
    assert external >= prompt_tokens - 1
    assert external + delta(BY_SOURCE, source="local_compute") == prompt_tokens
    moved = delta(BYTES)
    per_token = _bytes_per_token(MAIN_SHAPE)
    assert moved >= prompt_tokens * per_token
    assert moved % per_token == 0  # whole KV blocks of this model's shape
    assert delta(FAILED) == 0
    (pd.decode.run_dir / "metrics-after-pd.txt").write_text(scrape_text(pd.decode))


def test_prefill_returns_where_to_pull_the_kv_from(pd: Cluster) -> None:
    prefilled, response = prefill_then_decode(pd.prefill, pd.decode, "/v1/completions", COMPLETION)
    assert response.status_code == 200, response.text
    params = prefilled["kv_transfer_params"]
    assert params["do_remote_prefill"] is True
    assert params["do_remote_decode"] is False
    assert params["remote_host"] == "127.0.0.1"
    assert params["remote_port"] == pd.prefill.nixl_side_channel_port
    assert isinstance(params["remote_engine_id"], str)
    assert params["remote_engine_id"]
    assert params["remote_num_tokens"] == prefilled["usage"]["prompt_tokens"]
    blocks = params["remote_block_ids"]
    assert blocks
    assert all(isinstance(block, int) for group in blocks for block in group)
    # The decode's answer carries no transfer parameters of its own.
    assert response.json()["kv_transfer_params"] is None


def test_streamed_decode_equals_reference(pd: Cluster) -> None:
    expected = reference(pd.prefill, "/v1/completions", COMPLETION).json()["choices"][0]["text"]
    _, response = prefill_then_decode(
        pd.prefill, pd.decode, "/v1/completions", {**COMPLETION, "stream": True}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    text = "".join(
        choice["text"] for event in events[:-1] for choice in json.loads(event)["choices"]
    )
    assert text == expected


def test_chat_decode_equals_reference(pd: Cluster) -> None:
    ref = reference(pd.prefill, "/v1/chat/completions", CHAT)
    assert ref.status_code == 200, ref.text
    _, response = prefill_then_decode(pd.prefill, pd.decode, "/v1/chat/completions", CHAT)
    assert response.status_code == 200, response.text
    got, want = response.json(), ref.json()
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert got["usage"] == want["usage"]


def test_prefill_of_another_model_is_refused(pd: Cluster) -> None:
    """What vLLM 0.32 does when P and D disagree on the model.

    The decode worker's NIXL handshake compares a compatibility hash (vLLM
    version, model path, dtype, KV heads, head size, layers, attention backend,
    ...) and refuses the peer: ``RuntimeError: NIXL compatibility hash
    mismatch`` in its log. With ``kv_load_failure_policy: fail`` (the default)
    the request ends in error: HTTP 500 to the client, no token generated, no
    KV block loaded. The decode worker itself keeps serving.
    """
    assert OTHER_SHAPE != MAIN_SHAPE
    before = scrape(pd.decode)
    log_offset = pd.decode.log_path.stat().st_size

    prefilled, response = prefill_then_decode(
        pd.other_prefill, pd.decode, "/v1/completions", COMPLETION
    )
    # The mismatched prefill itself ran fine: it cannot know who will pull.
    assert prefilled["kv_transfer_params"]["remote_port"] == pd.other_prefill.nixl_side_channel_port

    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "InternalServerError"
    assert "choices" not in response.json()

    finished = "vllm:request_success_total"
    delta = _metrics_after(
        pd.decode, before, lambda d: d(FAILED) >= 1 and d(finished, finished_reason="error") >= 1
    )
    assert delta(FAILED) >= 1
    assert delta(finished, finished_reason="error") == 1
    assert delta(finished, finished_reason="length") == 0
    assert delta(BY_SOURCE, **EXTERNAL) == 0
    assert delta(BYTES) == 0
    assert delta("vllm:generation_tokens_total") == 0

    log = _log_since(pd.decode, log_offset, "NIXL compatibility hash mismatch")
    assert "NIXL compatibility hash mismatch" in log
    assert "Failing 1 request(s) due to KV load failure" in log

    # The decode worker is unharmed: the right prefill still works.
    _, again = prefill_then_decode(pd.prefill, pd.decode, "/v1/completions", COMPLETION)
    assert again.status_code == 200, again.text

"""The HTTP surface, in process (ASGITransport) on virtual time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.workers.emulator import engine, metrics, server, timing
from tandem.workers.emulator.scheduling import SchedulerConfig

MODEL = "emulated-llama-3.1-8b"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with server.in_process(server.EmulatorSettings(), clock=engine.VirtualClock()) as c:
        yield c


def _events(body: bytes) -> list[bytes]:
    """SSE payloads, checking vLLM's framing: ``data: ...\\n\\n`` and nothing else."""
    assert body.endswith(b"\n\n")
    frames = body[:-2].split(b"\n\n")
    for frame in frames:
        assert frame.startswith(b"data: ")
        assert b"\n" not in frame
    return [frame[len(b"data: ") :] for frame in frames]


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(text: str, sample: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise KeyError(sample)


async def test_completion_json_has_vllm_shape(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "a" * 40, "max_tokens": 5}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["text"].count("tok") == 5
    assert body["usage"] == {
        "prompt_tokens": 10,
        "total_tokens": 15,
        "completion_tokens": 5,
        "prompt_tokens_details": None,
    }
    assert body["kv_transfer_params"] is None
    again = await client.post("/v1/completions", json={"prompt": "a" * 40, "max_tokens": 5})
    assert again.json()["choices"][0]["text"] == choice["text"]  # deterministic


async def test_token_id_prompts_and_request_ids(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={"prompt": [1, 2, 3, 4, 5, 6, 7], "max_tokens": 2, "return_token_ids": True},
        headers={"X-Request-Id": "abc"},
    )
    body = r.json()
    assert body["id"] == "cmpl-abc"
    assert body["usage"]["prompt_tokens"] == 7
    choice = body["choices"][0]
    assert len(choice["token_ids"]) == 2
    assert choice["prompt_token_ids"] == [1, 2, 3, 4, 5, 6, 7]
    assert choice["text"] == "".join(f"tok{t} " for t in choice["token_ids"])


async def test_chat_json_has_vllm_shape(client: httpx.AsyncClient) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3})
    body = r.json()
    assert r.status_code == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"].count("tok") == 3
    # 2 + 2 text tokens, 3 per message, 3 for the reply header.
    assert body["usage"]["prompt_tokens"] == 4 + 2 * 3 + 3
    default = await client.post("/v1/chat/completions", json={"messages": messages})
    assert default.json()["usage"]["completion_tokens"] == 16


async def test_completion_stream_framing_and_usage(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": "hello",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens, usage = chunks[:-1], chunks[-1]
    assert len(tokens) == 4
    assert {c["object"] for c in tokens} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, None, "length"]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4
    plain = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
    assert "".join(c["choices"][0]["text"] for c in tokens) == plain.json()["choices"][0]["text"]


async def test_chat_stream_starts_with_the_role_and_has_no_usage_unless_asked(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
    )
    events = _events(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"]["content"].startswith("tok")
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


async def test_continuous_usage_stats(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    chunks = [json.loads(e) for e in _events(r.content)[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 2]


async def test_kv_transfer_params_round_trip_prefill_to_decode() -> None:
    prompt = "word " * 800  # 1000 tokens by the 4-bytes rule
    prefill_settings = server.EmulatorSettings(role="prefill", engine_id="P0", kv_port=5601)
    async with (
        server.in_process(prefill_settings, clock=engine.VirtualClock()) as prefill,
        server.in_process(
            server.EmulatorSettings(role="decode"), clock=engine.VirtualClock()
        ) as decode,
    ):
        first = await prefill.post(
            "/v1/completions",
            json={
                "prompt": prompt,
                "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True},
            },
        )
        body = first.json()
        params = body["kv_transfer_params"]
        assert params["do_remote_prefill"] is True
        assert params["do_remote_decode"] is False
        assert params["remote_engine_id"] == "P0"
        assert params["remote_port"] == 5601
        assert params["remote_host"] == "127.0.0.1"
        assert len(params["remote_block_ids"]) == 63  # ceil(1000 / 16)
        assert params["remote_request_id"]
        assert body["usage"]["completion_tokens"] == 1

        second = await decode.post(
            "/v1/completions",
            json={"prompt": prompt, "max_tokens": 4, "kv_transfer_params": params},
        )
        out = second.json()
        assert out["kv_transfer_params"] is None
        # The decode worker's first token is the one the prefill worker sampled.
        assert out["choices"][0]["text"].startswith(body["choices"][0]["text"])

        text = (await decode.get("/metrics")).text
        assert (
            _value(text, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
            == 1000
        )
        assert _value(text, "vllm:prompt_tokens_by_source_total", source="local_compute") == 1
        assert _value(text, "vllm:nixl_bytes_transferred_sum") == 63 * 16 * 131072
        assert _value(text, "vllm:nixl_bytes_transferred_count") == 1
        assert _value(text, "vllm:nixl_num_failed_transfers_total") == 0
        p_text = (await prefill.get("/metrics")).text
        assert _value(p_text, "vllm:prompt_tokens_by_source_total", source="local_compute") == 1000


async def test_incomplete_remote_prefill_params_fail_over_to_a_local_prefill() -> None:
    settings = server.EmulatorSettings(role="decode")
    async with server.in_process(settings, clock=engine.VirtualClock()) as decode:
        r = await decode.post(
            "/v1/completions",
            json={
                "prompt": "x" * 400,
                "max_tokens": 2,
                "kv_transfer_params": {"do_remote_prefill": True},
            },
        )
        assert r.status_code == 200
        text = (await decode.get("/metrics")).text
        assert _value(text, "vllm:nixl_num_failed_transfers_total") == 1
        assert _value(text, "vllm:prompt_tokens_by_source_total", source="local_compute") == 100


async def test_a_role_ignores_the_direction_it_does_not_take() -> None:
    async with server.in_process(
        server.EmulatorSettings(role="decode"), clock=engine.VirtualClock()
    ) as decode:
        r = await decode.post(
            "/v1/completions",
            json={
                "prompt": "hi",
                "max_tokens": 1,
                "kv_transfer_params": {"do_remote_decode": True},
            },
        )
        assert r.json()["kv_transfer_params"] is None


async def test_metrics_expose_every_family_with_vllm_types_and_labels(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 3})
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families = _families(r.text)
    assert set(families) == set(metrics.METRIC_NAMES)
    assert dict(metrics.family_names(r.text)) == dict(metrics.METRIC_TYPES)
    for name, kind in metrics.METRIC_TYPES.items():
        family = families[name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            assert sample.labels.get("engine") == "0", name
            if name != "vllm:cache_config_info":
                assert sample.labels.get("model_name") == MODEL, name
    assert "_created" not in r.text
    assert _value(r.text, "vllm:generation_tokens_total") == 3
    assert _value(r.text, "vllm:prompt_tokens_total") == 3
    assert _value(r.text, "vllm:request_success_total", finished_reason="length") == 1
    assert _value(r.text, "vllm:time_to_first_token_seconds_count") == 1
    assert _value(r.text, "vllm:inter_token_latency_seconds_count") == 2
    assert _value(r.text, "vllm:num_requests_running") == 0
    assert _value(r.text, "vllm:kv_cache_usage_perc") == 0
    info = families["vllm:cache_config_info"].samples[0].labels
    assert info["block_size"] == "16"
    assert int(info["num_gpu_blocks"]) > 20_000


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    (card,) = r.json()["data"]
    assert card["id"] == MODEL
    assert card["object"] == "model"
    assert card["max_model_len"] == 8192
    assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", b'{"max_tokens": 3}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
        ("/v1/completions", b'{"prompt": "x", "n": 2}', 400, "n"),
        ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 9000}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "kv_transfer_params": {"remote_port": "no"}}', 400,
         "kv_transfer_params"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 400, "messages.0.role"),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors(
    client: httpx.AsyncClient, path: str, payload: bytes, status: int, param: str | None
) -> None:
    r = await client.post(path, content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert error["param"] == param
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert error["message"]


async def test_a_prompt_longer_than_the_model_is_refused() -> None:
    settings = server.EmulatorSettings(max_model_len=100)
    async with server.in_process(settings, clock=engine.VirtualClock()) as c:
        r = await c.post("/v1/completions", json={"prompt": "x" * 800})
        assert r.status_code == 400
        assert "maximum context length is 100" in r.json()["error"]["message"]


async def test_overload_over_http_raises_ttft() -> None:
    settings = server.EmulatorSettings(scheduler=SchedulerConfig(max_num_seqs=2))
    async with server.in_process(settings, clock=engine.VirtualClock()) as c:
        responses = await asyncio.gather(
            *(
                c.post("/v1/completions", json={"prompt": "x" * 8000, "max_tokens": 8})
                for _ in range(12)
            )
        )
        assert all(r.status_code == 200 for r in responses)
        text = (await c.get("/metrics")).text
    assert _value(text, "vllm:request_success_total", finished_reason="length") == 12
    alone = timing.prefill_time(timing.LLAMA_3_1_8B, timing.H100, 2000)
    ttft_sum = _value(text, "vllm:time_to_first_token_seconds_sum")
    assert ttft_sum / 12 > 4 * alone
    # Most of that is time in the queue, behind the two running requests.
    assert _value(text, "vllm:request_queue_time_seconds_sum") > 0.5 * ttft_sum

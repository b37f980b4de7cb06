"""Request checks and the two hops' bodies (vLLM's NixlConnector protocol)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tandem.router import errors, payloads, settings, tokens

MODEL = "m"


def _config(**extra: Any) -> settings.RouterSettings:
    return settings.static_settings(MODEL, decode=["http://d:1"], **extra)


def _parse(api: payloads.Api, body: Any, **extra: Any) -> payloads.Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return payloads.parse(api, raw, _config(**extra), tokens.EstimatingCounter())


def test_malformed_json_is_a_400_invalid_json() -> None:
    with pytest.raises(errors.InvalidJSONError) as caught:
        _parse("completions", b"{nope")
    status, _, body = errors.http_response(caught.value)
    assert status == 400
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("api", "body", "param"),
    [
        ("completions", [1, 2], None),
        ("completions", {"prompt": 3}, "prompt"),
        ("completions", {"prompt": [1, "a"]}, "prompt"),
        ("completions", {"prompt": "x", "stream": "yes"}, "stream"),
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": ["hi"]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ],
)
def test_bad_requests_name_their_param(api: payloads.Api, body: Any, param: str | None) -> None:
    with pytest.raises(errors.BadRequestError) as caught:
        _parse(api, body)
    assert caught.value.param == param
    assert caught.value.status == 400


def test_unknown_model_is_a_404_model_not_found() -> None:
    with pytest.raises(errors.ModelNotFoundError) as caught:
        _parse("completions", {"model": "other", "prompt": "x"})
    status, _, body = errors.http_response(caught.value)
    assert status == 404
    assert json.loads(body)["error"]["code"] == "model_not_found"
    _parse("completions", {"prompt": "x"})  # no model: the served one


def test_limits_on_max_tokens_and_prompt_length() -> None:
    limits = {"limits": {"maxMaxTokens": 100, "maxPromptTokens": 10}}
    _parse("completions", {"prompt": "x" * 40, "max_tokens": 100}, **limits)
    with pytest.raises(errors.BadRequestError, match="max_completion_tokens"):
        _parse(
            "chat",
            {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 101},
            **limits,
        )
    with pytest.raises(errors.BadRequestError, match="41 tokens"):
        _parse("completions", {"prompt": "x" * 161}, **limits)
    with pytest.raises(errors.BadRequestError, match="prompt is 11 tokens"):
        _parse("completions", {"prompt": list(range(11))}, **limits)


def test_prompt_tokens_are_counted_only_when_needed() -> None:
    assert _parse("completions", {"prompt": "abcdefgh"}).prompt_tokens is None
    auto = _parse("completions", {"prompt": "abcdefgh"}, mode="auto")
    assert auto.prompt_tokens == 2
    assert auto.features.prompt_tokens == 2
    chat = _parse("chat", {"messages": [{"role": "user", "content": "abcd"}]}, mode="auto")
    # "user: abcd" is 10 bytes -> 3 tokens, plus 4 for the message's template
    assert chat.prompt_tokens == 3 + tokens.CHAT_MESSAGE_OVERHEAD
    ids = _parse("completions", {"prompt": [[1, 2, 3], [4]]}, mode="auto")
    assert ids.prompt_tokens == 4


def test_prompt_text_of_chat_parts_and_roles() -> None:
    body = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
    ]}  # fmt: skip
    assert payloads.prompt_text("chat", body) == ("system: be brief\nuser: hi", 0)


def test_prefix_key_uses_whole_leading_blocks() -> None:
    base = "a" * 64
    assert payloads.prefix_key(base + "x", 64, 2) == payloads.prefix_key(base + "y", 64, 2)
    assert payloads.prefix_key("short", 64, 2) != payloads.prefix_key("shorT", 64, 2)
    assert payloads.prefix_key("", 64, 2) is None
    long = "b" * 200
    assert payloads.prefix_key(long + "1", 64, 2) == payloads.prefix_key(
        long[:128] + "zz" * 50, 64, 2
    )


def test_prefix_key_only_for_prefix_aware() -> None:
    assert _parse("completions", {"prompt": "x"}).features.prefix_key is None
    request = _parse("completions", {"prompt": "x"}, policy="prefix-aware")
    assert request.features.prefix_key is not None
    ids = _parse("completions", {"prompt": [1, 2]}, policy="prefix-aware")
    assert ids.features.prefix_key is not None


def test_prefill_body_for_completions() -> None:
    request = _parse(
        "completions",
        {"model": MODEL, "prompt": "p", "max_tokens": 50, "stream": True,
         "stream_options": {"include_usage": True}, "min_tokens": 5, "temperature": 0.5},
    )  # fmt: skip
    body = json.loads(payloads.prefill_body(request))
    assert body == {
        "model": MODEL,
        "prompt": "p",
        "max_tokens": 1,
        "stream": False,
        "temperature": 0.5,
        "kv_transfer_params": {
            "do_remote_decode": True,
            "do_remote_prefill": False,
            "remote_engine_id": None,
            "remote_block_ids": None,
            "remote_host": None,
            "remote_port": None,
        },
    }
    assert request.body["max_tokens"] == 50  # the original is untouched


def test_prefill_body_for_chat_caps_max_completion_tokens() -> None:
    request = _parse(
        "chat", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
    )
    body = json.loads(payloads.prefill_body(request))
    assert body["max_tokens"] == 1
    assert body["max_completion_tokens"] == 1
    assert body["stream"] is False


def test_decode_body_adds_the_prefill_answer() -> None:
    request = _parse("completions", {"prompt": "p", "stream": True, "max_tokens": 7})
    params = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "remote_engine_id": "e",
              "remote_host": "10.0.0.1", "remote_port": 5600}  # fmt: skip
    answer = json.dumps({"choices": [], "kv_transfer_params": params}).encode()
    assert payloads.kv_transfer_params(answer) == params
    body = json.loads(payloads.decode_body(request, params))
    assert body == {"prompt": "p", "stream": True, "max_tokens": 7, "kv_transfer_params": params}


@pytest.mark.parametrize(
    "answer",
    [b"not json", b"[]", b"{}", b'{"kv_transfer_params": null}', b'{"kv_transfer_params": {}}'],
)
def test_no_kv_transfer_params(answer: bytes) -> None:
    assert payloads.kv_transfer_params(answer) is None


def test_local_body_passes_bytes_through_but_strips_client_kv_params() -> None:
    raw = b'{"prompt": "p",  "max_tokens": 3}'
    request = payloads.parse("completions", raw, _config(), tokens.EstimatingCounter())
    assert payloads.local_body(request) is raw
    sneaky = _parse("completions", {"prompt": "p", "kv_transfer_params": {"remote_host": "evil"}})
    assert "kv_transfer_params" not in json.loads(payloads.local_body(sneaky))
    assert (
        "remote_host"
        not in json.loads(payloads.decode_body(sneaky, {"a": 1}))["kv_transfer_params"]
    )


def test_models_body() -> None:
    body = json.loads(payloads.models_body(MODEL, 7))
    assert body == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 7, "owned_by": "tandem"}],
    }


def test_estimating_counter() -> None:
    counter = tokens.EstimatingCounter()
    assert counter.count("abcd") == 1
    assert counter.count("abcde") == 2
    assert counter.count("é" * 4) == 2  # utf-8 bytes
    assert not counter.exact
    assert isinstance(tokens.load(None), tokens.EstimatingCounter)
    assert isinstance(tokens.load("/nonexistent/tokenizer.json"), tokens.EstimatingCounter)

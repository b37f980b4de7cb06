"""The OpenAI API as vLLM speaks it: request models, token estimates, response shapes.

Pydantic lives here, at the edge; the rest of the emulator sees plain values.
Unknown request fields are ignored, as vLLM ignores them.

Prompt tokens. There is no tokenizer: a text prompt counts
``ceil(len(utf8_bytes) / 4)`` tokens (about 4 bytes per token for English BPE), a
prompt given as token ids counts its ids, and a chat counts its messages' text
plus 3 tokens per message and 3 for the assistant's reply header (OpenAI's
cookbook estimate of chat-template overhead).

Prompt token ids. A text is its UTF-8 bytes in 4-byte pieces, each piece an id
(mod the vocabulary); a chat is 3 header ids per message, its text's ids, and 3
ids of the reply header. So ``prompt_token_ids`` has as many ids as the estimate.

Output tokens. Deterministic fake tokens ``"tok<id> "``, each id a function of the
whole context before it (prompt ids, then the ids generated so far; a CRC-32
folded one id at a time), as a real greedy model's would be: a prefill worker and
the decode worker that continues its request produce the same first token, and a
request whose prompt is another's prompt ids plus its first k output ids goes on
with that request's output from token k (the router's decode migration relies on it).
"""

from __future__ import annotations

import array
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "KvTransferParams",
    "chat_prompt_ids",
    "chat_prompt_tokens",
    "context_state",
    "next_token",
    "text_ids",
    "text_tokens",
]

BYTES_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 3
CHAT_REPLY_PRIMING_TOKENS = 3


class ApiError(Exception):
    """An error answered as OpenAI/vLLM do: ``{"error": {message, type, param, code}}``."""

    TYPES: Mapping[int, str] = {
        400: "BadRequestError",
        404: "NotFoundError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "BadRequestError"),
                "param": self.param,
                "code": self.status,
            }
        }


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _Sampling(_Request):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    kv_transfer_params: dict[str, Any] | None = None
    return_token_ids: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class KvTransferParams(_Request):
    """vLLM's NixlConnector ``kv_transfer_params``; the remote_* fields come from a
    prefill worker's response and go with the request to the decode worker."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    remote_block_ids: list[int] | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_request_id: str | None = None
    tp_size: int = 1

    @field_validator("remote_block_ids", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        # Newer vLLM nests block ids per KV cache group: [[...]].
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return [b for group in value for b in group]
        return value

    def complete_for_remote_prefill(self) -> bool:
        return bool(
            self.remote_engine_id
            and self.remote_block_ids
            and self.remote_host
            and self.remote_port is not None
        )


def text_tokens(text: str) -> int:
    """Estimated tokens of a text: ``ceil(utf8 bytes / 4)``."""
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def chat_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """Estimated prompt tokens of a chat (see the module docstring)."""
    body = sum(CHAT_TOKENS_PER_MESSAGE + text_tokens(_content_text(m.content)) for m in messages)
    return body + CHAT_REPLY_PRIMING_TOKENS


def text_ids(text: str, vocab_size: int) -> list[int]:
    """Fake prompt ids of a text: one per 4 UTF-8 bytes (``text_tokens`` of them)."""
    data = text.encode("utf-8")
    data += b"\0" * (-len(data) % BYTES_PER_TOKEN)
    return [int.from_bytes(data[i : i + 4], "little") % vocab_size for i in range(0, len(data), 4)]


def chat_prompt_ids(messages: Sequence[ChatMessage], vocab_size: int) -> list[int]:
    """Fake prompt ids of a chat, ``chat_prompt_tokens`` of them."""
    ids: list[int] = []
    for message in messages:
        header = zlib.crc32(message.role.encode("utf-8"))
        ids += [(header + i) % vocab_size for i in range(CHAT_TOKENS_PER_MESSAGE)]
        ids += text_ids(_content_text(message.content), vocab_size)
    ids += [(vocab_size - 1 - i) % vocab_size for i in range(CHAT_REPLY_PRIMING_TOKENS)]
    return ids


def context_state(ids: Sequence[int], state: int = 0) -> int:
    """The generation state after ``ids`` (from ``state``): a CRC-32 of the ids."""
    return zlib.crc32(array.array("I", ids).tobytes(), state)


def next_token(state: int, vocab_size: int) -> tuple[int, int]:
    """The token sampled in ``state`` and the state after it."""
    token = (state * 2654435761 >> 7) % vocab_size
    return token, context_state((token,), state)


def token_text(token: int) -> str:
    return f"tok{token} "


FinishReasonText = Literal["stop", "length", "abort"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def completion_response(
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    token_ids: Sequence[int] | None,
    prompt_token_ids: Sequence[int] | None,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    kv_transfer_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
        "prompt_logprobs": None,
    }
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
        choice["prompt_token_ids"] = None if prompt_token_ids is None else list(prompt_token_ids)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens),
        "kv_transfer_params": None if kv_transfer_params is None else dict(kv_transfer_params),
    }


def chat_response(
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    token_ids: Sequence[int] | None,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    kv_transfer_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": text,
            "reasoning_content": None,
            "tool_calls": [],
        },
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
    }
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "kv_transfer_params": None if kv_transfer_params is None else dict(kv_transfer_params),
    }


def completion_chunk(
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    token_ids: Sequence[int] | None = None,
    prompt_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One streamed completion event; ``token_ids`` (and ``prompt_token_ids`` on the
    first event) when the request asked for ``return_token_ids``."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        ],
    }
    if token_ids is not None:
        chunk["choices"][0]["prompt_token_ids"] = (
            None if prompt_token_ids is None else list(prompt_token_ids)
        )
        chunk["choices"][0]["token_ids"] = list(token_ids)
    return chunk


def chat_chunk(
    *,
    request_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any],
    finish_reason: str | None,
    token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One streamed chat event; ``token_ids`` when the request asked for them."""
    choice: dict[str, Any] = {
        "index": 0,
        "delta": dict(delta),
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = None
    if token_ids is not None:
        choice["token_ids"] = list(token_ids)
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    *,
    request_id: str,
    obj: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def sse(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event, as vLLM frames them: ``data: <json>\\n\\n``."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

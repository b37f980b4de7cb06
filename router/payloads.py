"""OpenAI request bodies in, worker request bodies out: parsing, checks, translation.

Pure functions over bytes and dicts. :func:`parse` validates what the router needs
to route (the rest is the worker's business) and raises
:class:`~tandem.router.errors.RouterError` subclasses; :func:`prefill_body` and
:func:`decode_body` are the two hops of vLLM's NixlConnector protocol.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from tandem.router import errors, policies, settings, tokens

__all__ = [
    "PATHS",
    "Api",
    "Request",
    "decode_body",
    "dumps",
    "kv_transfer_params",
    "local_body",
    "models_body",
    "parse",
    "prefill_body",
    "prefix_key",
    "prompt_text",
]

Api = Literal["completions", "chat"]
PATHS: dict[Api, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# What the prefill hop asks for: compute the prompt's KV, keep it for a remote decode.
_PREFILL_KV = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# Fields a 1-token prefill must not carry (vLLM refuses min_tokens > max_tokens; a
# non-streaming request takes no stream_options).
_NOT_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")


@dataclass(frozen=True, slots=True)
class Request:
    """A checked client request."""

    api: Api
    body: dict[str, Any]
    raw: bytes
    stream: bool
    prompt_tokens: int | None
    """None when nothing needed it (no auto mode, no prompt limit)."""
    features: policies.Features


def dumps(body: dict[str, Any]) -> bytes:
    """Compact JSON, UTF-8 as is: what vLLM's own bodies look like."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def prompt_text(api: Api, body: dict[str, Any]) -> tuple[str, int]:
    """The text to count and hash, and the number of exact tokens / messages in it.

    Completions: a string, a list of strings (the first one: a batch goes to one
    worker), or token ids (returned as their count, text empty). Chat: each message
    as ``role: content`` on its own line, so a shared system prompt is a shared prefix.
    """
    if api == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt, 0
        if isinstance(prompt, list) and prompt:
            first = prompt[0]
            if isinstance(first, str) and all(isinstance(p, str) for p in prompt):
                return "\n".join(prompt), 0
            if isinstance(first, int) and all(isinstance(t, int) for t in prompt):
                return "", len(prompt)
            if isinstance(first, list) and all(
                isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt
            ):
                return "", sum(len(p) for p in prompt)
        raise errors.BadRequestError(
            "`prompt` must be a string, a list of strings or a list of token ids",
            param="prompt",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise errors.BadRequestError("`messages` must be a non-empty list", param="messages")
    lines: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise errors.BadRequestError("each message must be an object", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        elif content is not None and not isinstance(content, str):
            raise errors.BadRequestError(
                "message `content` must be a string or a list of parts", param="messages"
            )
        lines.append(f"{message.get('role', '')}: {content or ''}")
    return "\n".join(lines), 0


def prefix_key(text: str, block_chars: int, blocks: int) -> int | None:
    """A 64-bit hash of the prompt's leading whole blocks (at most ``blocks`` of them;
    the whole text when shorter than one block), None for an empty prompt."""
    if not text:
        return None
    whole = min(len(text) // block_chars, blocks) * block_chars or len(text)
    digest = hashlib.blake2b(text[:whole].encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise errors.BadRequestError(f"`{name}` must be a positive integer", param=name)
    return value


def parse(
    api: Api,
    raw: bytes,
    config: settings.RouterSettings,
    counter: tokens.TokenCounter,
) -> Request:
    """Check a client request and extract what routing needs."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidJSONError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise errors.BadRequestError("request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != config.served_model_name:
        raise errors.ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.BadRequestError("`stream` must be a boolean", param="stream")
    limit = config.limits.max_max_tokens
    for name in ("max_tokens", "max_completion_tokens"):
        asked = _positive_int(body, name)
        if limit is not None and asked is not None and asked > limit:
            raise errors.BadRequestError(
                f"`{name}` is {asked}, more than this server's limit of {limit}", param=name
            )

    text, exact = prompt_text(api, body)
    prompt_tokens: int | None = None
    max_prompt = config.limits.max_prompt_tokens
    if config.mode == "auto" or max_prompt is not None:
        prompt_tokens = exact + (counter.count(text) if text else 0)
        if api == "chat":
            prompt_tokens += tokens.CHAT_MESSAGE_OVERHEAD * len(body["messages"])
        if max_prompt is not None and prompt_tokens > max_prompt:
            raise errors.BadRequestError(
                f"the prompt is {prompt_tokens} tokens, more than this server's limit "
                f"of {max_prompt}",
                param="messages" if api == "chat" else "prompt",
            )
    key: int | None = None
    if config.policy == "prefix-aware":
        if not text and api == "completions":
            text = json.dumps(body.get("prompt"))  # token ids hash as their text
        key = prefix_key(text, config.prefix.block_chars, config.prefix.blocks)
    return Request(
        api=api,
        body=body,
        raw=raw,
        stream=stream,
        prompt_tokens=prompt_tokens,
        features=policies.Features(prompt_tokens or 0, key),
    )


def prefill_body(request: Request) -> bytes:
    """Hop 1: the same request, one token, not streamed, asking the prefill worker
    to keep the KV for a remote decode."""
    body = {k: v for k, v in request.body.items() if k not in _NOT_FOR_PREFILL}
    body["kv_transfer_params"] = dict(_PREFILL_KV)
    body["stream"] = False
    body["max_tokens"] = 1
    if request.api == "chat" or "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    return dumps(body)


def kv_transfer_params(response: bytes) -> dict[str, Any] | None:
    """What the prefill worker returned for the decode worker (None if nothing)."""
    try:
        body = json.loads(response)
    except (ValueError, UnicodeDecodeError):
        return None
    params = body.get("kv_transfer_params") if isinstance(body, dict) else None
    return params if isinstance(params, dict) and params else None


_TOKEN_IDS = {"return_token_ids": True}


def decode_body(request: Request, params: dict[str, Any], *, token_ids: bool = False) -> bytes:
    """Hop 2: the original request plus the prefill worker's ``kv_transfer_params``
    (and ``return_token_ids`` for a stream that may move: see ``migration``)."""
    return dumps(
        {**request.body, "kv_transfer_params": params, **(_TOKEN_IDS if token_ids else {})}
    )


def local_body(request: Request, *, token_ids: bool = False) -> bytes:
    """A request the decode worker prefills itself: the client's bytes, less any
    ``kv_transfer_params`` of its own (clients do not get to steer KV transfers)."""
    body = request.body
    if token_ids and not body.get("return_token_ids"):
        body = {**body, **_TOKEN_IDS}
    elif "kv_transfer_params" not in body:
        return request.raw
    return dumps({k: v for k, v in body.items() if k != "kv_transfer_params"})


def models_body(served_model_name: str, created: int) -> bytes:
    """``GET /v1/models``."""
    model = {"id": served_model_name, "object": "model", "created": created, "owned_by": "tandem"}
    return dumps({"object": "list", "data": [model]})

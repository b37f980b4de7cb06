"""Decode migration: a stream's token bookkeeping, and how it goes on elsewhere.

Pure (bytes and dicts in, bytes and dicts out); ``orchestration`` does the I/O.

A streamed request that can move (:func:`movable`) asks its decode worker for
``return_token_ids``; a :class:`Relay` reads the worker's SSE events on their way
to the client, keeps the prompt's token ids and every generated id the client got,
and takes out what the client did not ask for. When the worker dies mid-stream,
:meth:`Relay.continuation` is a ``/v1/completions`` request whose prompt is those
ids (the prompt's, then the generated ones), with the client's sampling and
``max_tokens`` less what was sent: any decode worker (a full vLLM server) prefills
it locally and goes on. The relay then rewrites the new worker's events into the
first one's stream: the same ``id``, ``created`` and ``model``, chat chunks for a
chat, and ``usage`` that counts the prompt once and every token the client got.

Parsing and re-encoding each event costs ~45 µs of CPU (a 270-byte completions
chunk, measured on the project's two loaded cores; 36 µs of it is ``json`` both
ways), i.e. ~2 ms per 40-token answer; paid only by requests that can move and
only when migration is on (``migrationLimit`` > 0): other bytes pass untouched.

Limits, from what the router cannot know without the model's tokenizer: text a
worker held back when it died (the tail that may begin a ``stop`` string, or an
incomplete UTF-8 character) is not re-sent; a ``seed``'s random stream restarts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from tandem.router import payloads

__all__ = ["Relay", "movable"]

_DONE = b"data: [DONE]"
_VLLM_COMPLETIONS_MAX_TOKENS = 16
"""vLLM's default ``max_tokens`` of ``/v1/completions``."""

# Chat fields a completions request takes with the same meaning (sampling, limits,
# bookkeeping); the chat-only ones (messages, tools, templates) are in the prompt ids.
_CHAT_TO_COMPLETIONS = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "length_penalty",
    "logit_bias",
    "ignore_eos",
    "min_tokens",
    "bad_words",
    "allowed_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "stream_options",
    "user",
    "priority",
    "cache_salt",
    "vllm_xargs",
)
# Completions fields that must not reach a continuation: the prompt is new
# (prompt_logprobs, truncation, echo would apply to it) and there are no KV to pull.
_NOT_FOR_CONTINUATION = (
    "kv_transfer_params",
    "prompt_logprobs",
    "truncate_prompt_tokens",
    "echo",
    "suffix",
    "max_completion_tokens",
)
# Requests whose output a plain continuation cannot reproduce: structured output
# (the grammar's state), tool calls (parsed from the whole text), beam search.
_STRUCTURED = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "use_beam_search",
)


def movable(request: payloads.Request) -> bool:
    """Whether a stream can move to another decode worker mid-way: one streamed
    choice of one prompt, nothing that depends on state the router cannot carry."""
    body = request.body
    if not request.stream or body.get("n", 1) not in (1, None):
        return False
    if body.get("best_of", 1) not in (1, None) or body.get("echo"):
        return False
    if any(body.get(name) for name in _STRUCTURED):
        return False
    if request.api == "chat":
        tools = body.get("tools") and body.get("tool_choice") != "none"
        return not (body.get("logprobs") or tools)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt) == 1  # a batch of one
    return True


Verdict = Literal["more", "done", "failed"]


@dataclass
class Relay:
    """One client stream across its decode workers (see the module docstring)."""

    api: payloads.Api
    body: dict[str, Any]
    """The client's request."""
    wants_ids: bool = False
    """The client asked for ``return_token_ids`` itself: the ids stay in its events."""
    wants_usage: bool = False
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    """Every token id of the events the client was sent."""
    tracked: bool = True
    """False once an event came without its token ids: the stream cannot move."""
    finished: bool = False
    """The client got a ``finish_reason``."""
    usage_sent: bool = False
    hops: int = 0
    """Continuations so far (0: still the first decode worker)."""
    failure: str = ""
    """The worker's own error event that ended the hop (:meth:`feed`'s ``failed``)."""
    _base: int = 0
    _head: dict[str, Any] | None = None
    _buffer: bytes = b""

    @classmethod
    def for_request(cls, request: payloads.Request) -> Relay:
        body = request.body
        options = body.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return cls(
            request.api, body, wants_ids=bool(body.get("return_token_ids")), wants_usage=usage
        )

    # -- the worker's events in, the client's out --------------------------------

    def feed(self, data: bytes) -> tuple[bytes, Verdict]:
        """Take a piece of the worker's body; returns the bytes for the client and
        whether the stream goes on (``more``), ended with ``[DONE]`` (``done``), or
        the worker reported a failure of its own (``failed``: its error event is
        kept from the client, the stream should move)."""
        buffer = self._buffer + data
        out: list[bytes] = []
        verdict: Verdict = "more"
        start = 0
        while verdict == "more":
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            event = buffer[start:end]
            start = end + 2
            if event == _DONE:
                out.append(_DONE + b"\n\n")
                verdict = "done"
                break
            sent, verdict = self._event(event)
            if sent:
                out.append(sent)
        self._buffer = buffer[start:] if verdict == "more" else b""
        return b"".join(out), verdict

    def _event(self, event: bytes) -> tuple[bytes | None, Verdict]:
        if not event.startswith(b"data: "):
            return event + b"\n\n", "more"  # a comment or another field: as it came
        try:
            chunk = json.loads(event[6:])
        except ValueError:
            self.tracked = False
            return event + b"\n\n", "more"
        if not isinstance(chunk, dict):
            return event + b"\n\n", "more"
        error = chunk.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            if isinstance(code, int) and code >= 500:
                self.failure = str(error.get("message") or f"error {code}")
                return None, "failed"
            return event + b"\n\n", "more"  # the request's own fault: the client's to see
        if self.hops == 0:
            changed, keep = self._first_hop(chunk)
        else:
            changed, keep = self._continued(chunk)
        if not keep:
            return None, "more"
        if not changed:
            return event + b"\n\n", "more"
        return _sse(chunk), "more"

    def _first_hop(self, chunk: dict[str, Any]) -> tuple[bool, bool]:
        """Track a chunk in the client's own API; (changed, keep)."""
        if self._head is None:
            self._head = {k: chunk.get(k) for k in ("id", "created", "model")}
        changed = False
        if "prompt_token_ids" in chunk:  # chat: on the first chunk
            if self.prompt_ids is None and isinstance(chunk["prompt_token_ids"], list):
                self.prompt_ids = chunk["prompt_token_ids"]
            if not self.wants_ids and chunk["prompt_token_ids"] is not None:
                chunk["prompt_token_ids"], changed = None, True
        choices = chunk.get("choices")
        if not choices:
            self._usage(chunk)
            return changed, True
        choice = choices[0]
        if not isinstance(choice, dict):
            self.tracked = False
            return changed, True
        prompt = choice.get("prompt_token_ids")  # completions: on the first chunk
        if isinstance(prompt, list) and self.prompt_ids is None:
            self.prompt_ids = prompt
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.generated += ids
        elif "delta" not in choice or (choice["delta"] or {}).get("role") is None:
            self.tracked = False  # a token chunk without its ids
        if choice.get("finish_reason") is not None:
            self.finished = True
        self._usage(chunk)
        if self.wants_ids:
            return changed, True
        if prompt is not None:
            choice["prompt_token_ids"] = None
        if ids is not None:
            choice["token_ids"] = None
        keep = True
        if (
            self.api == "chat"
            and ids is not None
            and "delta" in choice
            and not choice["delta"]
            and choice.get("finish_reason") is None
        ):
            # vLLM sends a chunk with no text only for the ids (a token whose text
            # it holds back): without ids the client would not have had it.
            keep = choice.get("logprobs") is not None
        return True, keep

    def _continued(self, chunk: dict[str, Any]) -> tuple[bool, bool]:
        """Rewrite a continuation's completions chunk into the client's stream."""
        head = self._head or {}
        choices = chunk.get("choices") or []
        out_choices: list[dict[str, Any]] = []
        for choice in choices[:1]:
            ids = choice.get("token_ids")
            if isinstance(ids, list):
                self.generated += ids
            else:
                self.tracked = False
            finish = choice.get("finish_reason")
            if finish is not None:
                self.finished = True
            if self.api == "chat":
                text = choice.get("text") or ""
                if not text and finish is None and not self.wants_ids:
                    continue  # as vLLM: no chunk for a held-back token's ids alone
                new: dict[str, Any] = {
                    "index": 0,
                    "delta": {"content": text} if text else {},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                if finish is not None:
                    new["stop_reason"] = choice.get("stop_reason")
                new["token_ids"] = ids if self.wants_ids else None
            else:
                new = dict(choice, index=0, prompt_token_ids=None)
                new["token_ids"] = ids if self.wants_ids else None
            out_choices.append(new)
        if choices and not out_choices:
            return True, False
        chunk.update(head)
        chunk["choices"] = out_choices
        if self.api == "chat":
            chunk["object"] = "chat.completion.chunk"
        self._usage(chunk)
        return True, True

    def _usage(self, chunk: dict[str, Any]) -> None:
        """Usage as the client's one request: the prompt once, every token sent."""
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            return
        if not chunk.get("choices"):
            self.usage_sent = True
        if self.hops == 0:
            return
        prompt = len(self.prompt_ids or ())
        completion = self._base + int(usage.get("completion_tokens") or 0)
        usage.update(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
        if usage.get("prompt_tokens_details") is not None:
            usage["prompt_tokens_details"] = None  # the continuation's cache, not the client's

    # -- moving ----------------------------------------------------------------

    @property
    def movable(self) -> bool:
        """Whether the stream can go on elsewhere from what the client got."""
        return self.tracked and self.prompt_ids is not None and self._head is not None

    def left(self, max_model_len: int | None = None) -> int | None:
        """Tokens still to generate; without a limit of the client's, what the
        model's length leaves (None when that is not known either)."""
        body = self.body
        asked = body.get("max_tokens")
        if self.api == "chat":
            asked = body.get("max_completion_tokens") or asked
        elif asked is None:
            asked = _VLLM_COMPLETIONS_MAX_TOKENS
        if isinstance(asked, int):
            return asked - len(self.generated)
        if max_model_len is None:
            return None
        return max_model_len - len(self.prompt_ids or ()) - len(self.generated)

    def continuation(self, max_model_len: int | None = None) -> bytes:
        """The next worker's request; starts reading its events as a continuation.
        ``max_model_len`` (the worker's) bounds a request the client did not bound:
        an unset ``max_tokens`` means 16 on ``/v1/completions``."""
        body = self.body
        if self.api == "chat":
            new = {k: body[k] for k in _CHAT_TO_COMPLETIONS if k in body}
        else:
            new = {k: v for k, v in body.items() if k not in _NOT_FOR_CONTINUATION}
        new["prompt"] = [*(self.prompt_ids or ()), *self.generated]
        left = self.left(max_model_len)
        if left is None:
            new.pop("max_tokens", None)
        else:
            new["max_tokens"] = max(left, 1)
        minimum = new.get("min_tokens")
        if isinstance(minimum, int) and minimum:
            new["min_tokens"] = max(0, minimum - len(self.generated))
        new.update(stream=True, return_token_ids=True)
        self.hops += 1
        self._base = len(self.generated)
        self._buffer = b""
        self.failure = ""
        return payloads.dumps(new)

    def ending(self, finish_reason: str | None = None) -> bytes:
        """The end of a stream whose last token the client already has: a finishing
        chunk when ``finish_reason`` is given, usage if asked and not sent, ``[DONE]``."""
        head = self._head or {}
        obj = "chat.completion.chunk" if self.api == "chat" else "text_completion"
        out: list[bytes] = []
        if finish_reason is not None:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
            if self.api == "chat":
                choice.update(delta={}, logprobs=None)
            else:
                choice.update(text="", logprobs=None)
            out.append(_sse({**head, "object": obj, "choices": [choice]}))
            self.finished = True
        if self.wants_usage and not self.usage_sent:
            prompt, completion = len(self.prompt_ids or ()), len(self.generated)
            usage = {
                "prompt_tokens": prompt,
                "total_tokens": prompt + completion,
                "completion_tokens": completion,
            }
            out.append(_sse({**head, "object": obj, "choices": [], "usage": usage}))
            self.usage_sent = True
        out.append(_DONE + b"\n\n")
        return b"".join(out)


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + payloads.dumps(chunk) + b"\n\n"

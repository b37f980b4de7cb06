"""The router's one error hierarchy, and its one mapping to OpenAI-style errors.

Every failure a client can see is a :class:`RouterError`. Lower layers' exceptions
(httpx, json) are translated into it where they are caught, with ``raise ... from``;
:func:`http_response` and :func:`sse_event` are the only places that turn one into
bytes: ``{"error": {"message", "type", "param", "code"}}``, the shape OpenAI and
vLLM use.
"""

from __future__ import annotations

import json
from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "InvalidJSONError",
    "MethodNotAllowedError",
    "ModelNotFoundError",
    "NoWorkersError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "QueueTimeoutError",
    "RouterError",
    "UpstreamError",
    "UpstreamRejectedError",
    "UpstreamTimeoutError",
    "http_response",
    "sse_event",
]

Headers = list[tuple[bytes, bytes]]
_JSON = (b"content-type", b"application/json")


class RouterError(Exception):
    """Base of everything a client can be told; subclasses set status, type and code."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    code: ClassVar[str | None] = None
    outcome: ClassVar[str] = "error"
    """The ``outcome`` label of ``tandem_router_requests_total``."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> Headers:
        return []

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()


class BadRequestError(RouterError):
    status = 400
    type = "invalid_request_error"
    outcome = "invalid"


class InvalidJSONError(BadRequestError):
    code = "invalid_json"


class AuthenticationError(RouterError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    outcome = "unauthorized"

    def headers(self) -> Headers:
        return [(b"www-authenticate", b"Bearer")]


class NotFoundError(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    outcome = "invalid"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class MethodNotAllowedError(RouterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    outcome = "invalid"


class PayloadTooLargeError(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    outcome = "invalid"


class OverloadedError(RouterError):
    """The router's queue is full: come back later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    outcome = "rejected"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> Headers:
        return [(b"retry-after", str(self.retry_after).encode())]


class QueueTimeoutError(OverloadedError):
    """Queued too long without a worker freeing up."""

    status = 503
    type = "service_unavailable"
    code = "queue_timeout"


class NoWorkersError(RouterError):
    status = 503
    type = "service_unavailable"
    code = "no_workers"
    outcome = "unavailable"


class UpstreamError(RouterError):
    """Workers failed (connection refused or reset, 5xx) and retries are spent."""

    status = 502
    type = "upstream_error"
    code = "upstream_failed"
    outcome = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"
    outcome = "timeout"


class UpstreamRejectedError(RouterError):
    """A worker refused the request itself (4xx, e.g. the prompt is longer than the
    model's context): its own error body goes to the client unchanged."""

    outcome = "invalid"

    def __init__(self, status: int, body: bytes, content_type: bytes) -> None:
        super().__init__(f"worker answered {status}")
        self.upstream_status = status
        self.upstream_body = body
        self.content_type = content_type


def http_response(exc: RouterError) -> tuple[int, Headers, bytes]:
    """Status, headers and body of the response that reports ``exc``."""
    if isinstance(exc, UpstreamRejectedError):
        body = exc.upstream_body
        return exc.upstream_status, [(b"content-type", exc.content_type)], body
    body = exc.body()
    return exc.status, [_JSON, *exc.headers()], body


def sse_event(exc: RouterError) -> bytes:
    """The end of a stream that broke after it started: an error event, then ``[DONE]``."""
    return b"data: " + exc.body() + b"\n\ndata: [DONE]\n\n"

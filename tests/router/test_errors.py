"""One hierarchy, one mapping to OpenAI-style error JSON."""

from __future__ import annotations

import json

import pytest

from tandem.router import errors


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (errors.BadRequestError("m", param="p"), 400, "invalid_request_error"),
        (errors.AuthenticationError("m"), 401, "invalid_request_error"),
        (errors.NotFoundError("m"), 404, "invalid_request_error"),
        (errors.MethodNotAllowedError("m"), 405, "invalid_request_error"),
        (errors.PayloadTooLargeError("m"), 413, "invalid_request_error"),
        (errors.OverloadedError("m", retry_after=3), 429, "rate_limit_error"),
        (errors.QueueTimeoutError("m", retry_after=3), 503, "service_unavailable"),
        (errors.NoWorkersError("m"), 503, "service_unavailable"),
        (errors.UpstreamError("m"), 502, "upstream_error"),
        (errors.UpstreamTimeoutError("m"), 504, "upstream_error"),
        (errors.RouterError("m"), 500, "internal_error"),
    ],
)
def test_http_response_shape(exc: errors.RouterError, status: int, kind: str) -> None:
    got_status, headers, body = errors.http_response(exc)
    assert got_status == status
    assert (b"content-type", b"application/json") in headers
    error = json.loads(body)["error"]
    assert error["message"] == "m"
    assert error["type"] == kind
    assert set(error) == {"message", "type", "param", "code"}


def test_retry_after_and_www_authenticate() -> None:
    _, headers, _ = errors.http_response(errors.OverloadedError("m", retry_after=2))
    assert (b"retry-after", b"2") in headers
    _, headers, _ = errors.http_response(errors.AuthenticationError("m"))
    assert (b"www-authenticate", b"Bearer") in headers


def test_upstream_rejection_is_passed_through() -> None:
    exc = errors.UpstreamRejectedError(
        400, b'{"error": {"message": "too long"}}', b"application/json"
    )
    assert errors.http_response(exc) == (
        400,
        [(b"content-type", b"application/json")],
        exc.upstream_body,
    )


def test_sse_event_ends_the_stream() -> None:
    event = errors.sse_event(errors.UpstreamError("gone"))
    first, second, rest = event.split(b"\n\n")
    assert first.startswith(b"data: ")
    assert json.loads(first[6:])["error"]["message"] == "gone"
    assert second == b"data: [DONE]"
    assert rest == b""

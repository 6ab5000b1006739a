"""What every answer of the relay shares, whichever layer sends it: the JSON type, CORS, and the one
error shape `{"error": message, "code": code}`, with the one renderer that turns whatever a request
raised into it (`refusal`), for the Quart routes and the events endpoint in front of them alike.

The error tree a request can end in:

- `ApiError`: a request the relay refuses (bad input, rate limit, unknown faction...), not logged;
- `werkzeug.exceptions.HTTPException`: what Quart refuses before a route runs (404, 405, 413...);
- `relay.storage.store.StoreError`: storage is failing: 503 `storage_unavailable`, logged at DEBUG
  (the database logs the outage: `relay/storage/outage.py`);
- anything else: a bug: 500 `internal_error`, logged with its traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from werkzeug.exceptions import HTTPException

from relay.storage.store import StoreError

JSON_TYPE = "application/json; charset=utf-8"
# Today's script runs on www.torn.com and asks the relay cross-origin.
CORS_HEADERS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Last-Event-ID",
    "Access-Control-Max-Age": "86400",
}
# The codes of what Quart refuses itself; any other status gets `http_<status>`.
HTTP_ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    414: "uri_too_long",
    431: "headers_too_large",
}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": message, "code": code}, separators=(",", ":")).encode()


def asgi_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


# An answer's headers on ASGI: JSON, with CORS, before its content-length.
JSON_HEADERS = [(b"content-type", JSON_TYPE.encode()), *asgi_headers(CORS_HEADERS)]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer in the one error shape: its status, code and message, and headers of its own
    (Retry-After, Allow) beside the JSON type and CORS that every answer has."""

    status: int
    code: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        return error_body(self.code, self.message)


STORAGE_UNAVAILABLE = Refusal(503, "storage_unavailable", "the relay's storage is not available right now")
INTERNAL_ERROR = Refusal(500, "internal_error", "the relay failed to answer this request")
BODY_TOO_LARGE = Refusal(413, "body_too_large", "the request body is larger than this relay accepts")


class ApiError(Exception):
    """A request the relay refuses: rendered as {"error": message, "code": code} with `status`."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, refusal: Refusal) -> ApiError:
        return cls(refusal.status, refusal.code, refusal.message, refusal.headers)


def refusal(exc: Exception, method: str, path: str, log: logging.Logger) -> Refusal:
    """The answer to a request that raised `exc`. Faults are logged to `log`, the answering layer's
    logger (so that per-logger levels in `[logging]` keep applying); refusals are not logged."""
    if isinstance(exc, ApiError):
        return Refusal(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, HTTPException):
        return _http_refusal(exc)
    if isinstance(exc, StoreError):
        # The outage itself is logged by the database, once and a summary a minute, not per request.
        log.debug("storage fault while answering %s %s: %s", method, path, exc)
        return STORAGE_UNAVAILABLE
    log.error("unexpected error answering %s %s", method, path, exc_info=exc)
    return INTERNAL_ERROR


def _http_refusal(exc: HTTPException) -> Refusal:
    status = exc.code or 500
    # A 405 must say which methods the path answers (RFC 9110 15.5.6); the body is ours, JSON.
    headers = {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}
    if status == BODY_TOO_LARGE.status:  # Quart's own limit, in the words of the relay's own check
        return Refusal(status, BODY_TOO_LARGE.code, BODY_TOO_LARGE.message, headers)
    return Refusal(
        status, HTTP_ERROR_CODES.get(status, f"http_{status}"), exc.description or exc.name, headers
    )

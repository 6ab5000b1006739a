"""What every answer of the relay shares, whichever layer sends it: the JSON type, CORS, and the one
error shape `{"error": message, "code": code}`."""

from __future__ import annotations

import json

JSON_TYPE = "application/json; charset=utf-8"
# Today's script runs on www.torn.com and asks the relay cross-origin.
CORS_HEADERS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Last-Event-ID",
    "Access-Control-Max-Age": "86400",
}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": message, "code": code}, separators=(",", ":")).encode()


def asgi_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

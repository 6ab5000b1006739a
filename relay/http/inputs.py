"""What a request may carry, parsed and refused in one place: every refusal is an `ApiError`, which
`relay.http.responses` renders as the one error shape."""

from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from relay.http.responses import BODY_TOO_LARGE, ApiError

MAX_FACTION_ID = 2**31 - 1
# Longest digit strings worth parsing: ten digits hold 2**31-1, sixteen hold any ms timestamp
# for the next 300,000 years; anything longer is refused before int() spends time on it.
MAX_FACTION_ID_DIGITS = 10
MAX_SINCE_DIGITS = 16
# Any number a client computes fits: the shortest form of every double (JavaScript's String(n),
# Python's repr) has at most 24 characters, such as 1.1041839962654692e+308, which is clamped.
MAX_WAIT_CHARS = 32
# A decimal number of 0 or more as programs write one (and as /openapi.json documents it); not the
# wider syntax of Python's float(), which also takes " 1", "1_0", "-0" and "infinity".
WAIT_SECONDS = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_faction_id(value: object) -> int:
    """A JSON integer, or a string of ASCII digits, from 1 to 2**31-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (
        isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= MAX_FACTION_ID_DIGITS
    ):
        number = int(value)
    else:
        raise ApiError(400, "invalid_faction_id", "faction_id must be an integer from 1 to 2147483647")
    if not 1 <= number <= MAX_FACTION_ID:
        raise ApiError(400, "invalid_faction_id", "faction_id must be an integer from 1 to 2147483647")
    return number


def parse_since(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_SINCE_DIGITS):
        raise ApiError(400, "invalid_since", "since must be a cursor: a whole number of milliseconds")
    return int(value)


def parse_wait(value: str | None, max_wait_s: float) -> float:
    """Seconds to hold a poll: 0 when absent; above the limit is clamped rather than refused."""
    if value is None or value == "":
        return 0.0
    if len(value) > MAX_WAIT_CHARS or not WAIT_SECONDS.fullmatch(value):
        raise ApiError(400, "invalid_wait", "wait must be a number of seconds, 0 or more")
    seconds = float(value)
    if not math.isfinite(seconds):  # 1e400: the syntax of a number, but no double holds it
        raise ApiError(400, "invalid_wait", "wait must be a number of seconds, 0 or more")
    return min(seconds, max_wait_s)


class _NonFiniteNumber(ValueError):
    pass


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999 is valid JSON syntax that no JSON reader can give back
        raise _NonFiniteNumber(text)
    return number


def _refuse_constant(name: str) -> float:
    raise _NonFiniteNumber(name)  # NaN, Infinity, -Infinity: Python reads them, JSON has none


def parse_json_object(body: str | bytes) -> Mapping[str, Any]:
    """A JSON object whose every number is finite: what the relay stores it serves to browsers,
    whose JSON.parse would refuse NaN or Infinity in an answer."""
    try:
        payload = json.loads(body, parse_float=_finite_float, parse_constant=_refuse_constant)
    except _NonFiniteNumber:
        raise ApiError(
            400, "invalid_json", "the request body has a number JSON cannot carry (NaN or infinite)"
        ) from None
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return payload


def check_api_key(presented: object, accepted: tuple[str, ...]) -> None:
    """Constant-time comparison against every accepted key; the key itself is never logged."""
    if not isinstance(presented, str) or not presented:
        raise ApiError(401, "invalid_api_key", "an api_key is required")
    candidate = presented.encode("utf-8", "surrogatepass")
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(candidate, key.encode("utf-8"))
    if not matched:
        raise ApiError(401, "invalid_api_key", "the api_key is not accepted by this relay")


def check_body_size(length: int | None, limit: int) -> None:
    if length is not None and length > limit:
        raise ApiError.of(BODY_TOO_LARGE)

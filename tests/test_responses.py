"""The one renderer (`relay.http.responses.refusal`): every exception a request can end in, as the status,
code, message and headers both layers send, and the log line each fault leaves."""

from __future__ import annotations

import json
import logging

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound, RequestEntityTooLarge, RequestURITooLarge

from relay.http.inputs import check_body_size
from relay.http.responses import (
    BODY_TOO_LARGE,
    INTERNAL_ERROR,
    STORAGE_UNAVAILABLE,
    ApiError,
    Refusal,
    refusal,
)
from relay.storage.store import StoreError

pytestmark = pytest.mark.unit

log = logging.getLogger("tests.answering_layer")


def test_a_refusal_is_the_one_error_shape() -> None:
    refused = Refusal(429, "rate_limited", "slow down", {"Retry-After": "2"})
    assert json.loads(refused.body) == {"error": "slow down", "code": "rate_limited"}
    assert refused.body == b'{"error":"slow down","code":"rate_limited"}'


def test_an_api_error_is_rendered_as_raised_and_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    exc = ApiError(429, "rate_limited", "slow down", {"Retry-After": "2"})
    assert refusal(exc, "GET", "/events", log) == Refusal(
        429, "rate_limited", "slow down", {"Retry-After": "2"}
    )
    assert caplog.records == []


def test_a_storage_fault_is_503_with_a_debug_line_naming_the_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At DEBUG only: the outage is the database's to log, once (`test_outage.py`), not per request."""
    caplog.set_level(logging.DEBUG, logger=log.name)
    assert refusal(StoreError("disk full"), "POST", "/subscribe", log) is STORAGE_UNAVAILABLE
    assert STORAGE_UNAVAILABLE.status == 503
    (record,) = caplog.records
    assert (record.name, record.levelno) == ("tests.answering_layer", logging.DEBUG)
    assert record.getMessage() == "storage fault while answering POST /subscribe: disk full"
    assert record.exc_info is None


def test_anything_else_is_500_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        raised = exc
    assert refusal(raised, "GET", "/events/stream", log) is INTERNAL_ERROR
    assert INTERNAL_ERROR.status == 500
    (record,) = caplog.records
    assert record.getMessage() == "unexpected error answering GET /events/stream"
    assert record.exc_info is not None
    assert record.exc_info[1] is raised
    assert "a bug" in caplog.text


def test_quarts_own_413_has_the_words_of_the_relays_own_body_check() -> None:
    with pytest.raises(ApiError) as checked:
        check_body_size(2, 1)
    ours = refusal(checked.value, "POST", "/subscribe", log)
    assert ours == BODY_TOO_LARGE
    assert refusal(RequestEntityTooLarge(), "POST", "/subscribe", log) == ours


def test_what_quart_refuses_keeps_its_status_and_gets_a_code() -> None:
    assert refusal(NotFound(), "GET", "/nowhere", log).code == "not_found"
    assert refusal(RequestURITooLarge(), "GET", "/", log).code == "uri_too_long"
    allowed = refusal(MethodNotAllowed(valid_methods=["POST"]), "GET", "/subscribe", log)
    assert (allowed.status, allowed.code, dict(allowed.headers)) == (
        405,
        "method_not_allowed",
        {"Allow": "POST"},
    )

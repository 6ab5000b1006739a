"""relay.http.events's pure parts: the query parser, against the standard library's on any query a
client can send. Its routes are tested over HTTP (test_delivery.py, test_error_shape.py)."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.http.events import _query

pytestmark = pytest.mark.unit

# The characters that steer parsing (separators, escapes, '+'), a few plain ones, and a non-ASCII byte.
STEERING = b"a1=&%+_2F\xe9"
QUERY_BYTES = st.lists(st.sampled_from([bytes([b]) for b in STEERING]), max_size=40).map(b"".join)


@given(QUERY_BYTES)
def test_the_query_is_read_as_parse_qsl_reads_it_first_name_winning(query: bytes) -> None:
    expected: dict[str, str] = {}
    for name, value in parse_qsl(
        query.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="replace"
    ):
        expected.setdefault(name, value)
    assert _query({"query_string": query}) == expected

"""`server.trusted_proxies`: behind a proxy the rate limit counts each member's address, taken from
the X-Forwarded-For the proxy appended, and nobody else's X-Forwarded-For (HTTP contract tier, through
Quart's test client, which goes through the same ASGI entry as hypercorn)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from relay.config import Config
from relay.service import RunningRelay, run_relay
from tests.helpers.factions import ANON_KEY

pytestmark = pytest.mark.contract

PROXY = "10.0.0.7"
STRANGER = "10.0.0.8"
# One request per address, then 429 for a long while: each answer says which bucket paid for it.
ONE_REQUEST_EACH = "[limits]\nclient_rate = 0.001\nclient_burst = 1\n"
UNKNOWN_FACTION = 777  # a poll for it costs a token, then answers 404: no subscription needed


@pytest.fixture
async def proxied(nursery: trio.Nursery, make_config: Callable[..., Config]) -> AsyncIterator[RunningRelay]:
    config = make_config(f'[server]\ntrusted_proxies = ["{PROXY}", "::1"]\n' + ONE_REQUEST_EACH)
    running: RunningRelay = await nursery.start(functools.partial(run_relay, config))
    yield running
    running.stop()


async def poll(relay: RunningRelay, peer: str, forwarded: str | None = None) -> int:
    """GET /events as it reaches the relay from `peer`: the path answered in front of Quart."""
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    response = await relay.app.test_client().get(
        f"/events?faction_id={UNKNOWN_FACTION}", headers=headers, scope_base={"client": (peer, 40000)}
    )
    return response.status_code


async def subscribe(relay: RunningRelay, peer: str, forwarded: str) -> int:
    """POST /subscribe from `peer`: a Quart route, rate-limited by `request.remote_addr`."""
    response = await relay.app.test_client().post(
        "/subscribe",
        json={"faction_id": 46666, "api_key": ANON_KEY},
        headers={"X-Forwarded-For": forwarded},
        scope_base={"client": (peer, 40000)},
    )
    return response.status_code


async def test_each_member_behind_a_trusted_proxy_has_a_bucket_of_its_own(proxied: RunningRelay) -> None:
    assert await poll(proxied, PROXY, "203.0.113.1") == 404
    assert await poll(proxied, PROXY, "203.0.113.2") == 404  # another member: another bucket
    assert await poll(proxied, PROXY, "203.0.113.1") == 429  # the first one's bucket is empty
    assert await poll(proxied, "::1", "2001:db8::5") == 404  # an IPv6 proxy and member
    assert await subscribe(proxied, PROXY, "203.0.113.3") == 200  # the Quart routes see the same
    assert await subscribe(proxied, PROXY, "203.0.113.3") == 429


async def test_only_the_address_the_proxy_appended_counts(proxied: RunningRelay) -> None:
    # Whatever a client put in its own X-Forwarded-For comes first; the proxy appends the real peer.
    assert await poll(proxied, PROXY, "198.51.100.1, 203.0.113.9") == 404
    assert await poll(proxied, PROXY, "198.51.100.2, 203.0.113.9") == 429
    assert await poll(proxied, PROXY, "198.51.100.3,203.0.113.10") == 404


async def test_an_untrusted_peers_forwarded_for_is_ignored(proxied: RunningRelay) -> None:
    assert await poll(proxied, STRANGER, "203.0.113.4") == 404
    assert await poll(proxied, STRANGER, "203.0.113.5") == 429  # the same peer, whatever it claims
    assert await subscribe(proxied, STRANGER, "203.0.113.6") == 429


async def test_a_trusted_proxy_without_a_usable_header_is_its_own_client(proxied: RunningRelay) -> None:
    assert await poll(proxied, PROXY) == 404
    assert await poll(proxied, PROXY, "not-an-address") == 429  # the proxy's own bucket again
    assert await poll(proxied, PROXY, "") == 429


async def test_without_trusted_proxies_the_header_means_nothing(
    nursery: trio.Nursery, make_config: Callable[..., Config]
) -> None:
    relay: RunningRelay = await nursery.start(functools.partial(run_relay, make_config(ONE_REQUEST_EACH)))
    assert await poll(relay, PROXY, "203.0.113.1") == 404
    assert await poll(relay, PROXY, "203.0.113.2") == 429
    relay.stop()


async def test_behind_a_trusted_proxy_client_js_names_the_relay_by_the_proxys_scheme(
    proxied: RunningRelay,
) -> None:
    # The proxy terminates TLS: the relay sees http, the member fetched https://relay.example/client.js.
    response = await proxied.app.test_client().get(
        "/client.js",
        headers={"Host": "relay.example", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"},
        scope_base={"client": (PROXY, 40000)},
    )
    source = await response.get_data(as_text=True)
    assert source.endswith('\nCATRelay.defaults.relayUrl = "https://relay.example";\n')

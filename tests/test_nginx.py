"""deploy/nginx.conf in Debian's nginx, in front of two `relay serve` processes sharing one fake upstream.

The config under test is the shipped file itself, rendered by a few exact substitutions (ports,
certificate paths, no IPv6 listens), each checked to still find its text, so that the file and the
test cannot drift apart; a small main config around it gives nginx a prefix of its own in tmp.
Every instance is asked about its factions directly (its own /status), never through nginx.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from relay.testing.fake_supabase import FakeSupabase
from tests.helpers.factions import ANON_KEY, call
from tests.helpers.ports import free_port
from tests.helpers.programs import NGINX, OPENSSL
from tests.helpers.relay_process import RelayProcess, relay_process
from tests.helpers.sse_client import open_sse
from tests.helpers.userscript import Userscript
from tests.helpers.waits import eventually_async

pytestmark = pytest.mark.external

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"
INSTANCE_PORTS = ("8444", "8445")  # the two `server` lines of the shipped upstream, in order
ACTIVE = {"connecting", "connected", "backoff"}  # an instance holding the faction's socket (or retrying it)
SUBSCRIBE_LIMIT = 16384  # server.max_body_bytes
PUBLISH_LIMIT = 262144  # publish.max_body_bytes
POLL_S = 0.05
# Small timings for the relays, and no rate limit in the scenarios, where one test client makes
# every member's requests (the per-address test sets its own).
RELAY_TOML = (
    '[server]\nport = 0\ntrusted_proxies = ["127.0.0.1"]\n[storage]\npath = "data/relay.db"\n'
    "[upstream]\nheartbeat_interval_s = 2.0\nconnect_timeout_s = 2.0\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\n"
)
NO_RATE_LIMIT = "[limits]\nclient_rate = 0\n"


@dataclass
class Deployment:
    url: str  # https://127.0.0.1:<port>, through nginx
    tls: ssl.SSLContext  # trusts the test's own certificate
    relays: list[RelayProcess]
    nginx_log: Path

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=self.tls, timeout=30, **kwargs)

    async def factions(self, instance: int) -> dict[int, dict[str, Any]]:
        """Instance `instance`'s own view of its factions, asked directly."""
        async with httpx.AsyncClient(base_url=self.relays[instance].url) as direct:
            status = (await direct.get("/status")).json()
        return {faction["faction_id"]: faction for faction in status["factions"]}

    async def state(self, instance: int, faction_id: int) -> str | None:
        faction = (await self.factions(instance)).get(faction_id)
        return None if faction is None else str(faction["upstream"]["state"])


def render(text: str, *, https_port: int, http_port: int, instances: list[int], cert: Path, key: Path) -> str:
    """The shipped config with the test's addresses: each substitution must find exactly its text."""
    substitutions = [
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;", 1),
        ("listen 80;", f"listen 127.0.0.1:{http_port};", 1),
        ("listen [::]:443 ssl http2;", "", 1),  # the test machine need not have IPv6
        ("listen [::]:80;", "", 1),
        ("/etc/letsencrypt/live/relay.example.com/fullchain.pem", str(cert), 1),
        ("/etc/letsencrypt/live/relay.example.com/privkey.pem", str(key), 1),
        *[
            (f"127.0.0.1:{shipped}", f"127.0.0.1:{port}", 2)  # its upstream server line and its mirror
            for shipped, port in zip(INSTANCE_PORTS, instances, strict=True)
        ],
    ]
    for old, new, count in substitutions:
        assert text.count(old) == count, f"deploy/nginx.conf no longer has {count} x {old!r}"
        text = text.replace(old, new)
    return text


def main_config(prefix: Path, site: Path) -> str:
    """What Debian's /etc/nginx/nginx.conf provides around conf.d/*.conf, kept inside `prefix`."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, workers would run as `nobody`, who cannot enter pytest's private tmp folders.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} info;\n"
        f"events {{ worker_connections 512; }}\n"
        f"http {{\n    access_log off;\n{temp}\n    include {site};\n}}\n"
    )


async def make_certificate(folder: Path) -> tuple[Path, Path, ssl.SSLContext]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    await trio.run_process(
        [str(OPENSSL), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_stdout=True,
        capture_stderr=True,
    )  # fmt: skip
    return cert, key, ssl.create_default_context(cafile=str(cert))


@asynccontextmanager
async def deployment(
    tmp_path: Path, fake: FakeSupabase, toml: str = NO_RATE_LIMIT
) -> AsyncIterator[Deployment]:
    env = {**os.environ, "RELAY_UPSTREAM_URL": fake.url, "RELAY_UPSTREAM_ANON_KEY": ANON_KEY}
    async with AsyncExitStack() as stack:
        relays = []
        for n in range(2):
            config = tmp_path / f"relay{n}" / "relay.toml"
            config.parent.mkdir()
            config.write_text(RELAY_TOML + toml)
            relays.append(await stack.enter_async_context(relay_process(config, env)))
        cert, key, tls = await make_certificate(tmp_path)
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        site = prefix / "cat-relay.conf"
        site.write_text(
            render(
                SHIPPED.read_text(),
                https_port=(https_port := free_port()),
                http_port=free_port(),
                instances=[int(relay.url.rsplit(":", 1)[1]) for relay in relays],
                cert=cert,
                key=key,
            )
        )
        (prefix / "nginx.conf").write_text(main_config(prefix, site))
        command = [
            str(NGINX),
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-e",
            str(prefix / "error.log"),
        ]
        checked = await trio.run_process([*command, "-t"], capture_stderr=True, check=False)
        assert checked.returncode == 0, checked.stderr.decode()
        process = await trio.lowlevel.open_process([*command, "-g", "daemon off;"], stdin=subprocess.DEVNULL)
        deployed = Deployment(f"https://127.0.0.1:{https_port}", tls, relays, prefix / "error.log")
        try:
            await wait_until_serving(deployed, process)
            yield deployed
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()


async def wait_until_serving(deploy: Deployment, process: trio.Process) -> None:
    async with deploy.client() as http:
        while True:
            assert process.returncode is None, deploy.nginx_log.read_text()
            try:
                if (await http.get("/ping")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await trio.sleep(POLL_S)


async def home_of(deploy: Deployment, faction_id: int) -> int:
    """The instance holding the faction's socket, once the other has its standby copy too; there
    must be exactly one."""
    while True:
        states = [await deploy.state(n, faction_id) for n in range(len(deploy.relays))]
        if None not in states:
            active = [n for n, state in enumerate(states) if state in ACTIVE]
            assert len(active) == 1, states
            assert states.count("stopped") == 1, states
            return active[0]
        await trio.sleep(POLL_S)


async def spread_factions(
    deploy: Deployment, subscribe: Callable[[int], Awaitable[object]]
) -> dict[int, int]:
    """Subscribe factions one by one through nginx until both instances are home to some; their homes."""
    homes: dict[int, int] = {}
    for faction_id in range(46000, 46040):
        await subscribe(faction_id)
        homes[faction_id] = await home_of(deploy, faction_id)
        if len(homes) >= 4 and set(homes.values()) == {0, 1}:
            return homes
    raise AssertionError(f"one instance is home to every faction: {homes}")


async def poll_until_call(script: Userscript, call_id: int) -> None:
    """Poll as today's script does until the call arrives (live, or as a reconcile's resync)."""
    while not any(message["payload"]["new"].get("id") == call_id for message in script.messages):
        await script.poll()
        await trio.sleep(POLL_S)


def padded(fields: dict[str, Any], faction_id: int, size: int) -> bytes:
    """A JSON body of exactly `size` bytes with the faction id last, after the padding: nginx finds
    it only if it has the whole body in memory when it chooses the instance."""
    shortest = len(json.dumps({**fields, "pad": "", "faction_id": faction_id}))
    body = json.dumps({**fields, "pad": "x" * (size - shortest), "faction_id": faction_id}).encode()
    assert len(body) == size
    return body


async def test_each_faction_lives_on_one_instance_and_follows_it_when_that_instance_goes(
    nginx_binary: Path, tmp_path: Path, fake_upstream: FakeSupabase
) -> None:
    with trio.fail_after(90):
        async with (
            deployment(tmp_path, fake_upstream, NO_RATE_LIMIT + "max_held_requests = 1\n") as deploy,
            deploy.client() as http,
        ):
            # Today's script: /ping, POST /subscribe with the faction only in the body, then polls.
            scripts: dict[int, Userscript] = {}

            async def start(faction_id: int) -> None:
                scripts[faction_id] = Userscript(http, faction_id)
                await scripts[faction_id].start()

            homes = await spread_factions(deploy, start)
            on_first = [f for f, home in homes.items() if home == 0]
            on_second = [f for f, home in homes.items() if home == 1]

            # The same faction as a string of digits, with leading zeros, goes to the same instance.
            again = await http.post(
                "/subscribe", json={"faction_id": f"0{on_second[0]}", "api_key": ANON_KEY}
            )
            assert again.json()["status"] == "subscribed"

            # Each faction's upstream change reaches its member through nginx by plain polls...
            for faction_id, script in scripts.items():
                fake_upstream.insert("war_calls", call(faction_id, faction_id))
                await poll_until_call(script, faction_id)
            # ...by a long-poll, held there until the change comes. Holding the relay's only held
            # request (max_held_requests = 1) makes it advise plain pollers to wait twice as long.
            long_polled = on_first[0]
            since = scripts[long_polled].cursor

            advice: list[int] = []

            async def ask_for_advice() -> None:
                answer = await http.get("/events", params={"faction_id": long_polled, "since": since})
                advice.append(answer.json()["next_poll_ms"])

            await ask_for_advice()
            unhurried = advice[-1]
            async with trio.open_nursery() as nursery:
                answers: list[httpx.Response] = []

                async def long_poll() -> None:
                    params = {"faction_id": long_polled, "since": since, "wait": 20}
                    answers.append(await http.get("/events", params=params))

                nursery.start_soon(long_poll)
                await eventually_async(ask_for_advice, lambda: advice[-1] == 2 * unhurried)
                fake_upstream.insert("war_calls", call(long_polled, 1))
            (answer,) = answers
            assert [event["data"]["new"]["id"] for event in answer.json()["events"]] == [1]
            # ...and by SSE, unbuffered: the change arrives while the stream stays open.
            streamed = on_second[0]
            path = f"/events/stream?faction_id={streamed}&since={scripts[streamed].cursor}"
            async with open_sse(deploy.url, path, tls=deploy.tls) as stream:
                assert stream.status == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                fake_upstream.insert("war_calls", call(streamed, 2))
                while (record := await stream.next_record()).get("event") != "postgres_changes":
                    pass  # keep-alive comments
                assert json.loads(record["data"])["data"]["new"]["id"] == 2  # and the stream is still open

            # None of it reached the other instance: a request there would have revived the faction.
            for faction_id, home in homes.items():
                assert await deploy.state(home, faction_id) == "connected"
                assert await deploy.state(1 - home, faction_id) == "stopped"

            # The first instance goes away. Its members' scripts poll on with the same cursor and never
            # re-subscribe; nginx sends their polls to the other instance, which knew the factions on
            # standby and revives each on its first poll.
            leaving = deploy.relays[0]
            leaving.process.send_signal(signal.SIGTERM)
            assert await leaving.process.wait() == 0
            for n, faction_id in enumerate(on_first, start=100):
                fake_upstream.insert("war_calls", call(faction_id, n))
                await poll_until_call(scripts[faction_id], n)
                assert await deploy.state(1, faction_id) == "connected"
            fake_upstream.insert("war_calls", call(on_second[0], 200))
            await poll_until_call(scripts[on_second[0]], 200)


async def test_bodies_up_to_the_relays_limits_go_to_their_factions_instance_and_errors_keep_its_shape(
    nginx_binary: Path, tmp_path: Path, fake_upstream: FakeSupabase
) -> None:
    json_type = {"Content-Type": "application/json"}
    with trio.fail_after(60):
        # HTTP/2, as browsers speak to this config: nginx reads its bodies differently from HTTP/1.1's.
        async with deployment(tmp_path, fake_upstream) as deploy, deploy.client(http2=True) as http:

            async def subscribe(faction_id: int) -> None:
                body = padded({"api_key": ANON_KEY}, faction_id, SUBSCRIBE_LIMIT)
                subscribed = await http.post("/subscribe", content=body, headers=json_type)
                assert subscribed.http_version == "HTTP/2"
                assert (subscribed.status_code, subscribed.json()["status"]) == (200, "subscribed")

            # A subscribe sent by the body's key to the wrong instance would leave the faction active
            # on both once the polls, keyed by the query, revived it on the right one.
            homes = await spread_factions(deploy, subscribe)
            members = {"members": [{"id": n, "status": "Okay"} for n in range(100)]}
            fields = {"api_key": ANON_KEY, "type": "faction_members_update", "data": members}
            published_to = {next(f for f, at in homes.items() if at == home) for home in (0, 1)}
            for faction_id in published_to:
                body = padded(fields, faction_id, PUBLISH_LIMIT)
                published = await http.post("/events", content=body, headers=json_type)
                assert (published.status_code, published.json()["status"]) == (200, "published")
            for faction_id, home in homes.items():
                script = Userscript(http, faction_id)
                script.cursor = 0
                await script.poll()
                expected = ["faction_members_update"] if faction_id in published_to else []
                assert [event["type"] for event in script.events] == expected
                assert await deploy.state(home, faction_id) in ACTIVE
                elsewhere = (await deploy.factions(1 - home))[faction_id]
                assert (elsewhere["upstream"]["state"], elsewhere["events_stored"]) == ("stopped", 0)

            # nginx says so whenever a body goes to a temporary file, where $request_body cannot see it.
            assert "buffered to a temporary file" not in deploy.nginx_log.read_text()

            # One byte more is refused by nginx, in the relay's error shape. Over HTTP/1.1: httpx's HTTP/2
            # client does not read an early 413 while it is still sending the body (it waits out its timeout).
            async with deploy.client() as http1:
                for path, limit in (
                    ("/subscribe", SUBSCRIBE_LIMIT),
                    ("/events", PUBLISH_LIMIT),
                    ("/hospital", PUBLISH_LIMIT),
                ):
                    refused = await http1.post(path, content=b" " * (limit + 1), headers=json_type)
                    assert refused.status_code == 413, path
                    assert refused.json()["code"] == "body_too_large"
                    assert refused.headers["access-control-allow-origin"] == "*"
                metrics = await http1.get("/metrics")  # per instance, scraped on its own port
                assert (metrics.status_code, metrics.json()["code"]) == (404, "not_found")
                # With every instance gone, so is nginx's answer.
                for relay in deploy.relays:
                    relay.process.send_signal(signal.SIGTERM)
                    assert await relay.process.wait() == 0
                unavailable = await http1.get("/events", params={"faction_id": 46000})
                assert (unavailable.status_code, unavailable.json()["code"]) == (502, "relay_unavailable")
                assert unavailable.headers["access-control-allow-origin"] == "*"


async def test_behind_nginx_each_member_address_has_its_own_rate_limit(
    nginx_binary: Path, tmp_path: Path, fake_upstream: FakeSupabase
) -> None:
    one_request_each = "[limits]\nclient_rate = 0.001\nclient_burst = 1\n"

    def member(address: str) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(local_address=address, verify=deploy.tls)
        return httpx.AsyncClient(base_url=deploy.url, transport=transport)

    with trio.fail_after(60):
        async with (
            deployment(tmp_path, fake_upstream, one_request_each) as deploy,
            member("127.0.0.2") as first,
            member("127.0.0.3") as second,
        ):
            poll = "/events?faction_id=777"  # unknown: 404 once the rate limit lets it through
            assert (await first.get(poll)).status_code == 404
            assert (await first.get(poll)).status_code == 429
            # Both reach the same instance from nginx's address; the member's own counts.
            assert (await second.get(poll)).status_code == 404

"""relay.config: defaults, file, environment and overrides, every kind of refusal, and the shipped relay.toml."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest

from relay.config import (
    DEFAULT_STORAGE_PATH,
    HELD_AS_PAIRS,
    OLD_NAMES,
    AuthConfig,
    ChannelConfig,
    Config,
    ConfigError,
    LimitsConfig,
    LoggingConfig,
    RetentionConfig,
    ServerConfig,
    UpstreamConfig,
    load_config,
)

pytestmark = pytest.mark.unit

URL = "wss://example.supabase.co/realtime/v1/websocket"
KEY = "anon-key-that-must-never-be-echoed"
REQUIRED = {"RELAY_UPSTREAM_URL": URL, "RELAY_UPSTREAM_ANON_KEY": KEY}
SHIPPED = Path(__file__).resolve().parents[1] / "relay.toml"
SHIPPED_URL = "wss://YOUR-PROJECT-REF.supabase.co/realtime/v1/websocket"
NOT_SECTIONS = {"source", "warnings"}  # Config's fields about the loading, not read from a table


def load(tmp_path: Path, toml: str, **env: str) -> Config:
    config_file = tmp_path / "relay.toml"
    config_file.write_text(toml)
    return load_config(config_file, environ={**REQUIRED, **env})


def refusal(tmp_path: Path, toml: str, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, **env)
    message = str(info.value)
    assert "\n" not in message
    assert KEY not in message
    return message


def test_defaults_with_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ=REQUIRED)
    assert config.source is None
    assert config.server == ServerConfig("127.0.0.1", 8444, 16384)
    assert config.storage.path == tmp_path / "data" / "relay.db"
    assert config.upstream == UpstreamConfig(URL, KEY, 25.0, 10.0, 1.0, 60.0)
    assert [channel.table for channel in config.upstream.channels] == [
        "war_calls",
        "faction_messages",
        "wars",
    ]
    assert config.retention == RetentionConfig(
        events_per_faction=100,
        maintenance_interval_s=300.0,
        subscription_ttl_s=1800.0,
        bytes_per_faction=4 * 1024 * 1024,
        memory_bytes_per_faction=512 * 1024,
        memory_bytes=32 * 1024 * 1024,
    )
    assert config.limits == LimitsConfig(max_factions=150, long_poll_max_wait_s=30.0, max_clock_skew_s=600.0)
    assert config.auth == AuthConfig(())
    assert config.accepted_api_keys == (KEY,)


@pytest.mark.parametrize(
    ("url", "rest_url", "expected"),
    [
        ("wss://abc.supabase.co/realtime/v1/websocket", "", "https://abc.supabase.co/rest/v1"),
        ("ws://127.0.0.1:5432/realtime/v1/websocket", "", "http://127.0.0.1:5432/rest/v1"),
        ("wss://h.example/base/realtime/v1/websocket/", "", "https://h.example/base/rest/v1"),
        ("wss://h.example/socket", "", "https://h.example/rest/v1"),
        (
            "wss://abc.supabase.co/realtime/v1/websocket",
            "https://api.example/rest/v1/",
            "https://api.example/rest/v1",
        ),
    ],
)
def test_the_rest_base_is_derived_from_the_realtime_url_unless_set(
    url: str, rest_url: str, expected: str
) -> None:
    assert UpstreamConfig(url, KEY, rest_url=rest_url).rest_base == expected


def test_filter_for_substitutes_the_faction() -> None:
    assert ChannelConfig("war_calls", "faction_id=eq.{faction_id}").filter_for(46666) == "faction_id=eq.46666"


def test_file_values(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [server]
        host = "0.0.0.0"
        port = 9000
        max_body_bytes = 4096
        trusted_proxies = ["10.0.0.7", "0:0:0:0:0:0:0:1"]
        [storage]
        path = "/var/lib/relay/relay.db"
        [upstream]
        heartbeat_interval_s = 5    # an int is fine where seconds are asked for
        connect_timeout_s = 2.5
        backoff_initial_s = 0.5
        backoff_max_s = 30.0
        rest_daily_budget_bytes = 1000000
        [[upstream.channels]]
        table = "wars"
        filter = "faction_id=eq.{faction_id}"
        [retention]
        events_per_faction = 10
        maintenance_interval_s = 60.0
        subscription_ttl_s = 600.0
        [limits]
        max_factions = 3
        max_standby_factions = 0    # learns no faction from standby subscribes
        long_poll_max_wait_s = 0
        max_clock_skew_s = 0.0
        [auth]
        api_keys = ["one", "two"]
        """,
    )
    # IPv6 in the spelling a socket reports its peer in, since that is what it is compared with.
    assert config.server == ServerConfig("0.0.0.0", 9000, 4096, ("10.0.0.7", "::1"))
    assert config.storage.path == Path("/var/lib/relay/relay.db")
    assert config.upstream == UpstreamConfig(
        URL,
        KEY,
        5.0,
        2.5,
        0.5,
        30.0,
        rest_daily_budget_bytes=1_000_000,
        channels=(ChannelConfig("wars", "faction_id=eq.{faction_id}"),),
    )
    assert type(config.upstream.heartbeat_interval_s) is float
    assert config.retention == RetentionConfig(10, 60.0, 600.0)
    assert config.limits == LimitsConfig(
        max_factions=3, max_standby_factions=0, long_poll_max_wait_s=0.0, max_clock_skew_s=0.0
    )
    assert config.accepted_api_keys == ("one", "two")
    assert config.source == tmp_path / "relay.toml"


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(
        tmp_path,
        """
        [server]
        host = "127.0.0.1"
        port = 8444
        [storage]
        path = "file.db"
        [upstream]
        url = "wss://file.example/realtime/v1/websocket"
        anon_key = "file-key"
        """,
        RELAY_SERVER_HOST="::1",
        RELAY_SERVER_PORT="0",
        RELAY_STORAGE_PATH="env/relay.db",
    )
    assert (config.server.host, config.server.port) == ("::1", 0)
    assert (config.upstream.url, config.upstream.anon_key) == (URL, KEY)
    assert config.storage.path == elsewhere / "env" / "relay.db"  # an env path is relative to the cwd


def test_overrides_win_over_the_environment(tmp_path: Path) -> None:
    config_file = tmp_path / "chosen.toml"
    config_file.write_text("[server]\nport = 1234\n")
    config = load_config(
        environ={**REQUIRED, "RELAY_SERVER_PORT": "1", "UNRELATED": "x"},
        overrides={"RELAY_SERVER_PORT": "2", "RELAY_CONFIG": str(config_file)},
    )
    assert config.server.port == 2
    assert config.source == config_file


def test_an_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="RELAY_SERVER_PROT"):
        load_config(environ=REQUIRED, overrides={"RELAY_SERVER_PROT": "1"})


def test_the_file_comes_from_the_argument_then_relay_config(tmp_path: Path) -> None:
    argument, named = tmp_path / "argument.toml", tmp_path / "named.toml"
    argument.write_text("[server]\nport = 1\n")
    named.write_text("[server]\nport = 2\n")
    environ = {**REQUIRED, "RELAY_CONFIG": str(named)}
    assert load_config(argument, environ=environ).server.port == 1
    assert load_config(environ=environ).server.port == 2


def test_environ_none_reads_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    for name, value in {**REQUIRED, "RELAY_SERVER_PORT": "4321"}.items():
        monkeypatch.setenv(name, value)
    assert load_config().server.port == 4321


def test_a_relative_storage_path_is_taken_from_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    (tmp_path / "etc").mkdir()
    config_file = tmp_path / "etc" / "relay.toml"
    config_file.write_text('[storage]\npath = "../data/relay.db"\n')
    config = load_config(config_file, environ=REQUIRED)
    assert config.storage.path.resolve() == tmp_path / "data" / "relay.db"
    assert load_config(config_file, environ=REQUIRED).storage.path.is_absolute()


def test_a_relative_config_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("relay.toml").write_text("")
    config = load_config(Path("relay.toml"), environ=REQUIRED)
    assert config.source == tmp_path / "relay.toml"
    assert config.storage.path == tmp_path / "data" / "relay.db"


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        # TOML syntax: the file and the line
        ("[server]\nport = \n", {}, ["relay.toml", "invalid TOML", "line 2"]),
        # unknown keys, at every level; their values are never shown
        ("[serverr]\n", {}, ["unknown key serverr"]),
        ("[server]\nprot = 1\n", {}, ["unknown key server.prot", "host, port, max_body_bytes"]),
        ("[server.tls]\ncert = 'x'\n", {}, ["unknown key server.tls"]),
        ("port = 8444\n", {}, ["unknown key port"]),
        ('[upstream]\nanonkey = "SECRET-VALUE"\n', {}, ["unknown key upstream.anonkey"]),
        (
            "[[upstream.channels]]\ntable = 'a'\ntabel = 'b'\nfilter = 'id=eq.{faction_id}'\n",
            {},
            ["unknown key upstream.channels[0].tabel"],
        ),
        # old names are read only where they were, and a typo in one is unknown like any other
        ("[limits]\nheartbeat_interval = 1\n", {}, ["unknown key limits.heartbeat_interval"]),
        (
            "[upstream]\nheartbeat_intervall = 1\n",
            {},
            ["unknown key upstream.heartbeat_intervall", "heartbeat_interval_s,"],
        ),
        # wrong types: key, expected type, value
        ('[server]\nport = "8444"\n', {}, ["server.port", "an integer", '"8444"', "string"]),
        ("[server]\nport = true\n", {}, ["server.port", "an integer", "true", "boolean"]),
        ("[limits]\nmax_factions = 1.5\n", {}, ["limits.max_factions", "an integer", "1.5", "float"]),
        ("[server]\nhost = 1\n", {}, ["server.host", "a string", "1", "integer"]),
        ("[upstream]\nconnect_timeout_s = true\n", {}, ["upstream.connect_timeout_s", "seconds", "true"]),
        ('[upstream]\nheartbeat_interval_s = "25s"\n', {}, ["upstream.heartbeat_interval_s", '"25s"']),
        ("[retention]\nsubscription_ttl_s = 1979-05-27\n", {}, ["retention.subscription_ttl_s", "date"]),
        # an old name refused for its value is named as the file spells it
        ('[upstream]\nheartbeat_interval = "25s"\n', {}, ["upstream.heartbeat_interval must", '"25s"']),
        ("server = 1\n", {}, ["server must be a table", "integer"]),
        # url
        ("[upstream]\nurl = 'https://x.supabase.co'\n", {"RELAY_UPSTREAM_URL": ""}, ["RELAY_UPSTREAM_URL"]),
        (
            "",
            {"RELAY_UPSTREAM_URL": "https://x.supabase.co/"},
            ["RELAY_UPSTREAM_URL", "https://x.supabase.co/"],
        ),
        ("", {"RELAY_UPSTREAM_URL": "wss://"}, ["RELAY_UPSTREAM_URL", "ws:// or wss://"]),
        ("", {"RELAY_UPSTREAM_URL": "wss://[::1/x"}, ["RELAY_UPSTREAM_URL", "ws:// or wss://"]),
        ("", {"RELAY_UPSTREAM_URL": "wss://h:99999/"}, ["RELAY_UPSTREAM_URL", "ws:// or wss://"]),
        ("", {"RELAY_UPSTREAM_URL": "wss://h/ws?apikey=SECRET-VALUE"}, ["RELAY_UPSTREAM_URL", "apikey"]),
        ("", {"RELAY_UPSTREAM_ANON_KEY": " "}, ["RELAY_UPSTREAM_ANON_KEY must not be empty"]),
        # seconds: positive and finite
        (
            "[upstream]\nheartbeat_interval_s = 0\n",
            {},
            ["upstream.heartbeat_interval_s", "more than zero", "0"],
        ),
        ("[upstream]\nconnect_timeout_s = -1.5\n", {}, ["upstream.connect_timeout_s", "-1.5"]),
        ("[upstream]\nbackoff_max_s = inf\n", {}, ["upstream.backoff_max_s", "finite", "inf"]),
        ("[retention]\nmaintenance_interval_s = nan\n", {}, ["retention.maintenance_interval_s", "nan"]),
        ("[retention]\nsubscription_ttl_s = 0.0\n", {}, ["retention.subscription_ttl_s", "0.0"]),
        ("[limits]\nlong_poll_max_wait_s = -1\n", {}, ["limits.long_poll_max_wait_s", "zero or more", "-1"]),
        ("[limits]\nmax_clock_skew_s = -0.5\n", {}, ["limits.max_clock_skew_s", "-0.5"]),
        (
            "[upstream]\nbackoff_initial_s = 61\n",
            {},
            ["upstream.backoff_initial_s (61)", "must not exceed", "upstream.backoff_max_s (60)"],
        ),
        (
            "[upstream]\nbackoff_initial = 61\n",
            {},
            ["upstream.backoff_initial (61)", "must not exceed", "upstream.backoff_max_s (60)"],
        ),
        # counts and sizes
        ("[retention]\nevents_per_faction = 0\n", {}, ["retention.events_per_faction", "at least 1", "0"]),
        ("[limits]\nmax_factions = 0\n", {}, ["limits.max_factions", "at least 1", "0"]),
        ("[limits]\nmax_standby_factions = -1\n", {}, ["limits.max_standby_factions", "at least 0", "-1"]),
        (
            "[upstream]\nrest_daily_budget_bytes = 0\n",
            {},
            ["upstream.rest_daily_budget_bytes", "at least 1", "0"],
        ),
        ("[server]\nport = 65536\n", {}, ["server.port", "from 0 to 65535", "65536"]),
        ("[server]\nport = -1\n", {}, ["server.port", "-1"]),
        ("", {"RELAY_SERVER_PORT": "http"}, ["RELAY_SERVER_PORT", "an integer", '"http"']),
        ("", {"RELAY_SERVER_PORT": "70000"}, ["RELAY_SERVER_PORT", "from 0 to 65535", "70000"]),
        ("[server]\nmax_body_bytes = 1023\n", {}, ["server.max_body_bytes", "at least 1024", "1023"]),
        ("", {"RELAY_SERVER_HOST": ""}, ["RELAY_SERVER_HOST must not be empty"]),
        # trusted_proxies: addresses, not names or networks
        ('[server]\ntrusted_proxies = "127.0.0.1"\n', {}, ["server.trusted_proxies", "array", "string"]),
        (
            '[server]\ntrusted_proxies = ["127.0.0.1", "proxy.local"]\n',
            {},
            ["server.trusted_proxies", "IP addresses", 'entry 1 is "proxy.local"'],
        ),
        ('[server]\ntrusted_proxies = ["10.0.0.0/8"]\n', {}, ["server.trusted_proxies", "no networks"]),
        (
            "[server]\ntrusted_proxies = [2130706433]\n",
            {},
            ["server.trusted_proxies", "entry 0 is 2130706433"],
        ),
        ("", {"RELAY_STORAGE_PATH": ""}, ["RELAY_STORAGE_PATH must not be empty"]),
        # channels
        ("[upstream]\nchannels = []\n", {}, ["upstream.channels", "at least one"]),
        ('[upstream]\nchannels = "war_calls"\n', {}, ["upstream.channels", '"war_calls"', "string"]),
        ("[[upstream.channels]]\ntable = 'war_calls'\n", {}, ["upstream.channels[0].filter is not set"]),
        (
            "[[upstream.channels]]\ntable = ''\nfilter = 'id=eq.{faction_id}'\n",
            {},
            ["upstream.channels[0].table must not be empty"],
        ),
        (
            "[[upstream.channels]]\ntable = 'war:calls'\nfilter = 'id=eq.{faction_id}'\n",
            {},
            ["upstream.channels[0].table", '"war:calls"'],
        ),
        (
            "[[upstream.channels]]\ntable = 'a'\nfilter = 'id=eq.{faction_id}'\n"
            "[[upstream.channels]]\ntable = 'a'\nfilter = 'x=eq.{faction_id}'\n",
            {},
            ["upstream.channels[1].table", "repeats", '"a"'],
        ),
        (
            "[[upstream.channels]]\ntable = 'a'\nfilter = 'id=eq.{faction}'\n",
            {},
            ["upstream.channels[0].filter", "{faction_id}", '"id=eq.{faction}"'],
        ),
        (
            "[[upstream.channels]]\ntable = 'a'\nfilter = 'id=eq.{faction_id!r}'\n",
            {},
            ["upstream.channels[0].filter", "only {faction_id}"],
        ),
        (
            "[[upstream.channels]]\ntable = 'a'\nfilter = 'id=eq.{faction_id'\n",
            {},
            ["upstream.channels[0].filter", "not a valid template", '"id=eq.{faction_id"'],
        ),
        (
            "[[upstream.channels]]\ntable = 'a'\nfilter = 'id=eq.1'\n",
            {},
            ["upstream.channels[0].filter", "must contain {faction_id}", '"id=eq.1"'],
        ),
        (
            "[[upstream.channels]]\ntable = 'a'\nfilter = 'id=eq.{faction_id}'\ndeletes = 'never'\n",
            {},
            ["upstream.channels[0].deletes", "shared, filtered", '"never"'],
        ),
        (
            "[upstream]\nrest_url = 'ftp://x/rest/v1'\n",
            {},
            ["upstream.rest_url", "http://", '"ftp://x/rest/v1"'],
        ),
        ("[upstream]\nrest_url = 7\n", {}, ["upstream.rest_url", "a string", "7"]),
        # api_keys: described, never shown
        (
            '[auth]\napi_keys = "SECRET-VALUE"\n',
            {},
            ["auth.api_keys", "array of non-empty strings", "string"],
        ),
        ('[auth]\napi_keys = ["ok", ""]\n', {}, ["auth.api_keys", "entry 1 is an empty string"]),
        ('[auth]\napi_keys = ["SECRET-VALUE", 7]\n', {}, ["auth.api_keys", "entry 1 is an integer"]),
        ('auth = ["SECRET-VALUE"]\n', {}, ["auth must be a table", "array"]),
        ("[upstream]\nanon_key = 12345\n", {"RELAY_UPSTREAM_ANON_KEY": ""}, ["RELAY_UPSTREAM_ANON_KEY"]),
        # logging
        ('[logging]\nformat = "xml"\n', {}, ["logging.format", "human, json", '"xml"']),
        ('[logging]\nlevel = "debug"\n', {}, ["logging.level", "DEBUG, INFO", '"debug"']),
        ('[logging]\nlevels = "DEBUG"\n', {}, ["logging.levels", "a table of logger = level"]),
        (
            '[logging.levels]\nrelay.store = "DEBUG"\n',
            {},
            ["logging.levels", "gives relay", "quote a dotted"],
        ),
        ('[logging.levels]\n"trio-websocket" = "DEBUG"\n', {}, ["logging.levels", "would log the anon key"]),
    ],
)
def test_refusals_name_the_key_and_value(
    tmp_path: Path, toml: str, env: dict[str, str], expected: list[str]
) -> None:
    message = refusal(tmp_path, toml, **env)
    for part in expected:
        assert part in message
    assert "SECRET-VALUE" not in message


@pytest.mark.parametrize(("old", "new"), OLD_NAMES.items())
def test_an_old_key_name_is_read_as_the_new_one_with_one_warning_naming_both(
    tmp_path: Path, old: str, new: str
) -> None:
    section, old_key = old.split(".")
    new_key = new.split(".")[1]
    config = load(tmp_path, f"[{section}]\n{old_key} = 7\n")
    assert getattr(getattr(config, section), new_key) == 7.0
    assert len(config.warnings) == 1
    (warning,) = config.warnings
    assert "\n" not in warning
    assert re.search(rf"{re.escape(old)}\b", warning)  # the old name itself, not the new one
    assert new in warning
    assert str(tmp_path / "relay.toml") in warning
    assert config == load(tmp_path, f"[{section}]\n{new_key} = 7\n")


def test_each_old_name_in_a_file_is_one_warning_and_new_names_are_none(tmp_path: Path) -> None:
    old_file = "[upstream]\nheartbeat_interval = 5\nbackoff_max = 30\n[limits]\nlong_poll_max_wait = 0\n"
    config = load(tmp_path, old_file)
    assert [warning.split(" ", 1)[0] for warning in config.warnings] == [
        "upstream.heartbeat_interval",
        "upstream.backoff_max",
        "limits.long_poll_max_wait",
    ]
    assert load(tmp_path, re.sub(r" = ", "_s = ", old_file)).warnings == ()
    assert load(tmp_path, "").warnings == ()


def test_a_maintenance_interval_not_below_the_clock_skew_allowed_is_warned_about(tmp_path: Path) -> None:
    """The maintenance pass writes the wall clock down as the relay's clock: at an interval as long
    as the skew allowed, an idle instance's cursors can fall that far behind a busy neighbour's."""
    (warning,) = load(tmp_path, "[retention]\nmaintenance_interval_s = 600\n").warnings
    assert "retention.maintenance_interval_s (600 s)" in warning
    assert "limits.max_clock_skew_s (600 s)" in warning
    assert load(tmp_path, "[retention]\nmaintenance_interval_s = 599\n").warnings == ()
    assert load(tmp_path, "[limits]\nmax_clock_skew_s = 0\n").warnings == ()  # no skew allowed at all


def test_an_old_and_a_new_name_for_the_same_key_are_refused(tmp_path: Path) -> None:
    # Whichever one won, the operator reading the other would believe it in force.
    message = refusal(tmp_path, "[retention]\nsubscription_ttl = 600\nsubscription_ttl_s = 900\n")
    assert message == (
        "retention.subscription_ttl and retention.subscription_ttl_s are both set: "
        "keep only retention.subscription_ttl_s (retention.subscription_ttl is its old name)"
    )


def test_a_secret_of_the_wrong_type_is_described_not_shown(tmp_path: Path) -> None:
    config_file = tmp_path / "relay.toml"
    config_file.write_text("[upstream]\nanon_key = 1234567\n")
    with pytest.raises(ConfigError) as info:
        load_config(config_file, environ={"RELAY_UPSTREAM_URL": URL})
    assert str(info.value) == "upstream.anon_key must be a string, got an integer"


@pytest.mark.parametrize(
    ("environ", "missing", "how"),
    [
        ({"RELAY_UPSTREAM_ANON_KEY": KEY}, "upstream.url is not set", "RELAY_UPSTREAM_URL"),
        ({"RELAY_UPSTREAM_URL": URL}, "upstream.anon_key is not set", "RELAY_UPSTREAM_ANON_KEY"),
    ],
)
def test_a_missing_url_or_key_says_how_to_set_it(environ: dict[str, str], missing: str, how: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ)
    message = str(info.value)
    assert message.startswith(missing)
    assert how in message
    assert "under [upstream]" in message
    assert "none was read" in message


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=r"cannot read config file .*nowhere\.toml"):
        load_config(missing, environ=REQUIRED)
    with pytest.raises(ConfigError, match=re.escape("nowhere.toml (from RELAY_CONFIG)")):
        load_config(environ={**REQUIRED, "RELAY_CONFIG": str(missing)})
    with pytest.raises(ConfigError, match="RELAY_CONFIG is set but empty"):
        load_config(environ={**REQUIRED, "RELAY_CONFIG": ""})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[server]\nhost = '\xff'\n")
    with pytest.raises(ConfigError, match=re.escape("binary.toml: not UTF-8")):
        load_config(binary, environ=REQUIRED)


def test_config_is_frozen_and_its_repr_keeps_secrets(tmp_path: Path) -> None:
    config = load(tmp_path, '[auth]\napi_keys = ["SECRET-VALUE"]\n')
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.upstream = config.upstream  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.upstream.channels[0].table = "other"  # type: ignore[misc]
    assert KEY not in repr(config)
    assert "SECRET-VALUE" not in repr(config)


def test_logging_levels_are_a_table_of_logger_names(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[logging]\nformat = "json"\nlevels = { "relay.storage.store" = "DEBUG", hypercorn = "ERROR" }\n',
    )
    assert config.logging == LoggingConfig(
        "json", "INFO", (("hypercorn", "ERROR"), ("relay.storage.store", "DEBUG"))
    )


def test_the_shipped_relay_toml_loads_as_the_defaults() -> None:
    config = load_config(SHIPPED, environ={"RELAY_UPSTREAM_ANON_KEY": KEY})
    assert config.source == SHIPPED
    assert config.server == ServerConfig()
    assert config.storage.path == SHIPPED.parent / DEFAULT_STORAGE_PATH
    assert config.upstream == UpstreamConfig(SHIPPED_URL, KEY)
    assert (config.retention, config.limits, config.auth) == (RetentionConfig(), LimitsConfig(), AuthConfig())
    assert config.logging == LoggingConfig()


def as_toml(value: object) -> object:
    """A default as the TOML parser would hand it back: tuples as arrays, dataclasses as tables."""
    if isinstance(value, tuple):
        return [as_toml(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: as_toml(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def test_the_shipped_relay_toml_holds_every_key_at_its_default() -> None:
    document = tomllib.loads(SHIPPED.read_text())
    sections = typing.get_type_hints(Config)
    without_default = {"upstream.url": SHIPPED_URL, "storage.path": DEFAULT_STORAGE_PATH}
    assert set(document) == {f.name for f in dataclasses.fields(Config)} - NOT_SECTIONS
    for name, table in document.items():
        for f in dataclasses.fields(sections[name]):
            dotted = f"{name}.{f.name}"
            if dotted == "upstream.anon_key":  # a secret: shown commented out, set in the environment
                assert f.name not in table
                continue
            expected = without_default[dotted] if f.default is dataclasses.MISSING else as_toml(f.default)
            if dotted in HELD_AS_PAIRS:
                expected = dict(typing.cast(tuple[tuple[str, str], ...], f.default))
            # repr, so that 25 in the file where 25.0 is the default counts as a difference
            assert repr(table[f.name]) == repr(expected), dotted


def test_the_shipped_relay_toml_explains_every_key() -> None:
    explained: dict[str, bool] = {}
    section, previous = "", ""
    for line in SHIPPED.read_text().splitlines():
        stripped = line.strip()
        here = previous.startswith("#") or re.search(r"\s#\s", stripped) is not None
        if header := re.match(r"\[(\[)?([\w.]+)\]", stripped):
            section = header[2]
            if header[1]:  # an array of tables is itself a key: [[upstream.channels]]
                explained[section] = explained.get(section, False) or here
        elif key := re.match(r"(# )?(\w+) = ", stripped):
            dotted = f"{section}.{key[2]}"
            explained[dotted] = explained.get(dotted, False) or here
        previous = stripped
    keys = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        if section.name not in NOT_SECTIONS
        for f in dataclasses.fields(typing.get_type_hints(Config)[section.name])
    } | {f"upstream.channels.{f.name}" for f in dataclasses.fields(ChannelConfig)}
    assert explained == dict.fromkeys(keys, True)
    limits = SHIPPED.read_text().split("[limits]")[1].split("[auth]")[0]
    assert "Supabase Free" in limits
    assert "200" in limits


def test_shown_values_stay_short(tmp_path: Path) -> None:
    message = refusal(tmp_path, f'[server]\nport = "{"9" * 500}"\n')
    assert len(message) < 200

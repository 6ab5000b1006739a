"""The relay's one frozen configuration: defaults, then `relay.toml`, then `RELAY_*` environment variables.

Everything is checked here, once, at start-up: a refusal is a `ConfigError` of one line naming the key (or
the variable) and the offending value, so nothing later has to wonder whether a setting makes sense.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import string
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

DEFAULT_STORAGE_PATH: Final = "data/relay.db"
# A /subscribe body carries the anon key, a JWT of a few hundred bytes; a smaller cap would refuse real clients.
MIN_BODY_BYTES: Final = 1024
# A retention size below a typical burst of calls (a few hundred bytes each) would make every poll read disk.
MIN_RETAINED_BYTES: Final = 16 * 1024
MAX_PORT: Final = 65535
# Tables go into Phoenix topics (`realtime:public:<table>:<filter>`), where a ':' or '.' would change the meaning.
TABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLACEHOLDER: Final = "faction_id"
URL_EXAMPLE: Final = "wss://<ref>.supabase.co/realtime/v1/websocket"
REST_URL_EXAMPLE: Final = "https://<ref>.supabase.co/rest/v1"
REALTIME_PATH: Final = "/realtime/v1/websocket"
DELETE_ROUTES: Final = ("shared", "filtered")
# Keys whose TOML form is a table, held in the frozen config as sorted (name, value) pairs.
HELD_AS_PAIRS: Final = frozenset({"logging.levels"})
LOG_FORMATS: Final = ("human", "json")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SHOWN_CHARS: Final = 80  # a refusal stays one readable line even when the value is a pasted blob

CONFIG_VARIABLE: Final = "RELAY_CONFIG"
ENV_KEYS: Final = {
    "RELAY_UPSTREAM_URL": "upstream.url",
    "RELAY_UPSTREAM_ANON_KEY": "upstream.anon_key",
    "RELAY_SERVER_HOST": "server.host",
    "RELAY_SERVER_PORT": "server.port",
    "RELAY_STORAGE_PATH": "storage.path",
}
# Durations got their unit in their name (`_s`). A relay.toml written before that keeps working: each old
# name is read as the new one, with a warning naming both. No RELAY_* variable ever named a duration.
OLD_NAMES: Final = {
    "upstream.heartbeat_interval": "upstream.heartbeat_interval_s",
    "upstream.connect_timeout": "upstream.connect_timeout_s",
    "upstream.backoff_initial": "upstream.backoff_initial_s",
    "upstream.backoff_max": "upstream.backoff_max_s",
    "upstream.reconcile_interval": "upstream.reconcile_interval_s",
    "retention.maintenance_interval": "retention.maintenance_interval_s",
    "retention.subscription_ttl": "retention.subscription_ttl_s",
    "limits.long_poll_max_wait": "limits.long_poll_max_wait_s",
}


class ConfigError(Exception):
    """A refusal: one line for a person, naming the key (dotted, or the env var) and the offending value.

    The value of a secret (`upstream.anon_key`, `auth.api_keys`) is never part of the message.
    """


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8444
    max_body_bytes: int = 16384
    # Peers whose X-Forwarded-For names the client: the reverse proxy in front (deploy/nginx.conf).
    trusted_proxies: tuple[str, ...] = ()
    # Answer plain polls and /ping at the request boundary (relay.http.hotpath): same bytes, 3x faster.
    hot_path: bool = True


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    table: str
    filter: str
    key: str = "id"  # the table's primary-key column: what faction state is keyed by
    # "shared": one unfiltered DELETE subscription per table for the whole relay, routed to the faction
    # by the stored row's key (needed under REPLICA IDENTITY DEFAULT, where a DELETE carries only the
    # key and so never matches a faction filter); "filtered": the faction's own channel is enough
    # (the table has REPLICA IDENTITY FULL).
    deletes: str = "shared"

    def filter_for(self, faction_id: int) -> str:
        return self.filter.format(faction_id=faction_id)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    anon_key: str = field(repr=False)  # so that logging a config, or a traceback, never shows it
    heartbeat_interval_s: float = 25.0
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    joins_per_second: float = 20.0
    rest_url: str = ""  # PostgREST base; empty: derived from url (…/realtime/v1/websocket → …/rest/v1)
    reconcile_interval_s: float = 300.0  # only while probe_interval_s is 0 (relay.upstream.deafness)
    probe_interval_s: float = 40.0  # 0: no deafness probes, a full reconcile every reconcile_interval_s
    probe_grace_s: float = 10.0
    # Not enforced: exported as cat_relay_upstream_rest_daily_budget_bytes for the egress alert
    # (deploy/prometheus/alerts.yml), so that the threshold lives in one place. 50 MB is a third of
    # Supabase Free's 5 GB of egress a month; a healthy relay reads far less (README "What a faction
    # costs upstream").
    rest_daily_budget_bytes: int = 50_000_000
    channels: tuple[ChannelConfig, ...] = (
        ChannelConfig("war_calls", "faction_id=eq.{faction_id}"),
        ChannelConfig("faction_messages", "faction_id=eq.{faction_id}"),
        ChannelConfig("wars", "faction_id=eq.{faction_id}"),
    )

    @property
    def key_columns(self) -> dict[str, str]:
        """Each channel's table and the column its rows are keyed by."""
        return {channel.table: channel.key for channel in self.channels}

    @property
    def rest_base(self) -> str:
        """Where PostgREST answers: `rest_url`, or derived from `url` when that is empty."""
        return self.rest_url.rstrip("/") if self.rest_url else derive_rest_url(self.url)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    events_per_faction: int = 100
    maintenance_interval_s: float = 300.0
    subscription_ttl_s: float = 1800.0
    # The newest events of each faction are kept by count and by size, whichever binds first (the
    # newest one always). Sizes are of an event's JSON as served. Beyond memory_bytes_per_faction (per
    # faction) and memory_bytes (all factions), the older kept events are read from the database.
    bytes_per_faction: int = 4 * 1024 * 1024
    memory_bytes_per_faction: int = 512 * 1024
    memory_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_factions: int = 150
    # Known but inactive factions (standby copies from nginx's mirror, expired ones): 4 times max_factions,
    # room for the factions of four more full instances behind the same nginx.
    max_standby_factions: int = 600
    long_poll_max_wait_s: float = 30.0
    long_poll_linger_s: float = 0.05
    max_held_requests: int = 10000
    max_clock_skew_s: float = 600.0
    client_rate: float = 20.0
    client_burst: int = 120


@dataclass(frozen=True, slots=True)
class PublishConfig:
    types: tuple[str, ...] = ("hospital_update", "faction_members_update")
    max_body_bytes: int = 262144


@dataclass(frozen=True, slots=True)
class AuthConfig:
    api_keys: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = "human"  # or "json": one object per line
    level: str = "INFO"
    levels: tuple[tuple[str, str], ...] = ()  # (logger name, level), from a TOML table


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    storage: StorageConfig
    upstream: UpstreamConfig
    retention: RetentionConfig
    limits: LimitsConfig
    publish: PublishConfig
    auth: AuthConfig
    logging: LoggingConfig
    source: Path | None
    # One line per old key name the file used, for the CLI to log once logging is set up as this config
    # says. Not compared: two configs with the same values are the same however the file spelled them.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def accepted_api_keys(self) -> tuple[str, ...]:
        """What /subscribe accepts: today's userscript sends the anon key, so that is the default."""
        return self.auth.api_keys or (self.upstream.anon_key,)


SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerConfig,
    "storage": StorageConfig,
    "upstream": UpstreamConfig,
    "retention": RetentionConfig,
    "limits": LimitsConfig,
    "publish": PublishConfig,
    "auth": AuthConfig,
    "logging": LoggingConfig,
}


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Read `path` (else `$RELAY_CONFIG`, else no file), apply `RELAY_*` from `environ` then `overrides`."""
    env = _relay_environ(os.environ if environ is None else environ, overrides or {})
    source = _choose_file(path, env)
    tables = _sections(_read_toml(source, from_env=path is None) if source is not None else {})
    old_names, warnings = _rename_old_keys(tables, source)
    labels = {**old_names, **_apply_env(tables, env)}
    where = f"in {source}" if source is not None else "in a config file (none was read)"

    def section(name: str) -> _Table:
        return _Table(name, tables[name], SECTIONS[name], labels)

    server, storage, upstream = section("server"), section("storage"), section("upstream")
    retention, limits, auth = section("retention"), section("limits"), section("auth")
    publish, logs = section("publish"), section("logging")
    from_file = source is not None and "storage.path" not in labels
    config = Config(
        server=ServerConfig(
            host=server.string("host"),
            port=server.integer("port", low=0, high=MAX_PORT),
            max_body_bytes=server.integer("max_body_bytes", low=MIN_BODY_BYTES),
            trusted_proxies=_trusted_proxies(server),
            hot_path=server.boolean("hot_path"),
        ),
        storage=StorageConfig(
            _absolute(storage.string("path", default=DEFAULT_STORAGE_PATH), source if from_file else None)
        ),
        upstream=_upstream(upstream, where),
        retention=RetentionConfig(
            events_per_faction=retention.integer("events_per_faction", low=1),
            bytes_per_faction=retention.integer("bytes_per_faction", low=MIN_RETAINED_BYTES),
            memory_bytes_per_faction=retention.integer("memory_bytes_per_faction", low=MIN_RETAINED_BYTES),
            memory_bytes=retention.integer("memory_bytes", low=MIN_RETAINED_BYTES),
            maintenance_interval_s=retention.seconds("maintenance_interval_s"),
            subscription_ttl_s=retention.seconds("subscription_ttl_s"),
        ),
        limits=LimitsConfig(
            max_factions=limits.integer("max_factions", low=1),
            # 0: this relay learns no faction from standby subscribes (one relay on its own needs none).
            max_standby_factions=limits.integer("max_standby_factions", low=0),
            # Upper bounds rather than intervals: 0 is meaningful (answer at once, allow no skew).
            long_poll_max_wait_s=limits.seconds("long_poll_max_wait_s", allow_zero=True),
            long_poll_linger_s=limits.seconds("long_poll_linger_s", allow_zero=True),
            max_held_requests=limits.integer("max_held_requests", low=0),
            max_clock_skew_s=limits.seconds("max_clock_skew_s", allow_zero=True),
            client_rate=limits.rate("client_rate", allow_zero=True),
            client_burst=limits.integer("client_burst", low=1),
        ),
        publish=PublishConfig(
            types=_publish_types(publish),
            max_body_bytes=publish.integer("max_body_bytes", low=MIN_BODY_BYTES),
        ),
        auth=AuthConfig(_api_keys(auth)),
        logging=_logging(logs),
        source=source,
        warnings=warnings,
    )
    return dataclasses.replace(config, warnings=(*warnings, *_doubtful(config)))


def _doubtful(config: Config) -> list[str]:
    """Settings that work, but not as an operator would want: said once at start-up."""
    maintenance_s, skew_s = config.retention.maintenance_interval_s, config.limits.max_clock_skew_s
    if 0 < skew_s <= maintenance_s:
        # The maintenance pass is what writes the wall clock down as the relay's clock: an idle
        # instance's cursor can lag its neighbour's by that long after the clock steps back.
        return [
            f"retention.maintenance_interval_s ({maintenance_s:g} s) is not below limits.max_clock_skew_s"
            f" ({skew_s:g} s): after the machine's clock steps back, an idle instance behind the same"
            " proxy may refuse the cursors a busy one handed out (400 invalid_since); see README"
            ' "Clocks"'
        ]
    return []


def _relay_environ(environ: Mapping[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    known = {CONFIG_VARIABLE, *ENV_KEYS}
    for name in overrides:
        if name not in known:
            raise ConfigError(f"unknown override {name} (known: {', '.join(sorted(known))})")
    return {name: value for name, value in {**environ, **overrides}.items() if name in known}


def _choose_file(path: Path | None, env: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path).absolute()
    named = env.get(CONFIG_VARIABLE)
    if named is None:
        return None
    if not named:
        raise ConfigError(f"{CONFIG_VARIABLE} is set but empty: name a relay.toml or unset it")
    return Path(named).absolute()


def _read_toml(source: Path, *, from_env: bool) -> dict[str, Any]:
    named = f" (from {CONFIG_VARIABLE})" if from_env else ""
    try:
        with source.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}{named}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)" and never quotes the text, so no secret leaks.
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc


def _sections(document: Mapping[str, Any]) -> dict[str, dict[str, object]]:
    for name in document:
        if name not in SECTIONS:
            known = ", ".join(f"[{section}]" for section in SECTIONS)
            raise ConfigError(f"unknown key {name} (the file has only the sections {known})")
    tables: dict[str, dict[str, object]] = {}
    for name in SECTIONS:
        table = document.get(name, {})
        if not isinstance(table, dict):
            # No value shown: `auth = ["key"]` for `[auth]` would otherwise print a secret.
            raise ConfigError(f"{name} must be a table ([{name}]), got {_kind(table)}")
        tables[name] = dict(table)
    return tables


def _rename_old_keys(
    tables: dict[str, dict[str, object]], source: Path | None
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Move each old key to its new name; return the old name of each key moved (so that a refusal names
    what the file says) and one warning per key."""
    labels: dict[str, str] = {}
    warnings: list[str] = []
    for old, new in OLD_NAMES.items():
        section, old_key = old.split(".")
        new_key = new.split(".")[1]
        table = tables[section]
        if old_key not in table:
            continue
        if new_key in table:
            # Refused rather than letting one win: the two values may differ, and the operator who reads
            # the one that lost would believe it in force.
            raise ConfigError(f"{old} and {new} are both set: keep only {new} ({old} is its old name)")
        table[new_key] = table.pop(old_key)
        labels[new] = old
        warnings.append(f"{old} in {source} is an old name: call it {new} (the old name is still read)")
    return labels, tuple(warnings)


def _apply_env(tables: dict[str, dict[str, object]], env: Mapping[str, str]) -> dict[str, str]:
    """Put each variable's value in place of its key; return which dotted keys now come from which variable."""
    labels: dict[str, str] = {}
    for name, dotted in ENV_KEYS.items():
        if name not in env:
            continue
        section, key = dotted.split(".")
        value: object = env[name]
        if name == "RELAY_SERVER_PORT":
            try:
                value = int(env[name])
            except ValueError:
                raise ConfigError(
                    f"{name} must be an integer from 0 to {MAX_PORT}, got {_show(value)}"
                ) from None
        tables[section][key] = value
        labels[dotted] = name
    return labels


def _absolute(raw: str, relative_to_file: Path | None) -> Path:
    # Relative to the file, not the cwd, so a service manager starting the relay elsewhere finds the same database.
    path = Path(raw)
    if path.is_absolute():
        return path
    return (relative_to_file.parent if relative_to_file is not None else Path.cwd()) / path


def _upstream(table: _Table, where: str) -> UpstreamConfig:
    url = table.string(
        "url", hint=f': put url = "{URL_EXAMPLE}" under [upstream] {where}, or set RELAY_UPSTREAM_URL'
    )
    anon_key = table.string(
        "anon_key",
        secret=True,
        hint=f": set RELAY_UPSTREAM_ANON_KEY to the project's anon key, or anon_key under [upstream] {where}",
    )
    _check_url(table, url)
    upstream = UpstreamConfig(
        url=url,
        anon_key=anon_key,
        heartbeat_interval_s=table.seconds("heartbeat_interval_s"),
        connect_timeout_s=table.seconds("connect_timeout_s"),
        backoff_initial_s=table.seconds("backoff_initial_s"),
        backoff_max_s=table.seconds("backoff_max_s"),
        joins_per_second=table.rate("joins_per_second"),
        rest_url=_rest_url(table),
        reconcile_interval_s=table.seconds("reconcile_interval_s"),
        probe_interval_s=table.seconds("probe_interval_s", allow_zero=True),
        probe_grace_s=table.seconds("probe_grace_s"),
        rest_daily_budget_bytes=table.integer("rest_daily_budget_bytes", low=1),
        channels=_channels(table),
    )
    if upstream.backoff_initial_s > upstream.backoff_max_s:
        raise ConfigError(
            f"{table.label('backoff_initial_s')} ({upstream.backoff_initial_s:g}) must not exceed "
            f"{table.label('backoff_max_s')} ({upstream.backoff_max_s:g})"
        )
    return upstream


def _check_url(table: _Table, url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        parts.port  # noqa: B018 -- parsing the port is what raises ValueError for a bad one
    except ValueError:
        parts, query = None, {}
    if "apikey" in query:
        # Not shown, since the value is a key; it would be replaced by upstream.anon_key anyway.
        raise table.refuse("url", "must not carry ?apikey=: set RELAY_UPSTREAM_ANON_KEY instead")
    if parts is None or parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise table.refuse("url", f"must be a ws:// or wss:// URL such as {URL_EXAMPLE}, got {_show(url)}")


def derive_rest_url(realtime_url: str) -> str:
    """Supabase serves PostgREST beside Realtime: wss://<ref>.supabase.co/realtime/v1/websocket has its
    REST interface at https://<ref>.supabase.co/rest/v1."""
    parts = urllib.parse.urlsplit(realtime_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    path = parts.path.rstrip("/")
    prefix = path[: -len(REALTIME_PATH)] if path.endswith(REALTIME_PATH) else ""
    return urllib.parse.urlunsplit((scheme, parts.netloc, f"{prefix}/rest/v1", "", ""))


def _rest_url(table: _Table) -> str:
    value = table.value("rest_url")
    if not isinstance(value, str):
        raise table.refuse("rest_url", _expected("a string", value))
    if not value:
        return value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise table.refuse(
            "rest_url", f"must be an http:// or https:// URL such as {REST_URL_EXAMPLE}, got {_show(value)}"
        )
    return value


def _channels(upstream: _Table) -> tuple[ChannelConfig, ...]:
    entries = upstream.value("channels")
    if isinstance(entries, tuple):  # the default, already valid
        return entries
    label = upstream.label("channels")
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{label} must be [[{label}]] tables, got {_show(entries)} ({_kind(entries)})")
    if not entries:
        raise ConfigError(
            f"{label} must hold at least one [[{label}]] entry: with none, no faction sees a change"
        )
    channels: list[ChannelConfig] = []
    for index, entry in enumerate(entries):
        table = _Table(f"{label}[{index}]", entry, ChannelConfig, {})
        channel = ChannelConfig(
            table.string("table"),
            table.string("filter"),
            key=table.string("key"),
            deletes=table.string("deletes"),
        )
        if channel.deletes not in DELETE_ROUTES:
            raise table.refuse(
                "deletes", f"must be one of {', '.join(DELETE_ROUTES)}, got {_show(channel.deletes)}"
            )
        if not TABLE_NAME.fullmatch(channel.table):
            raise table.refuse(
                "table", f"must be a plain table name (letters, digits, _), got {_show(channel.table)}"
            )
        if any(seen.table == channel.table for seen in channels):
            raise table.refuse("table", f"repeats {_show(channel.table)}: one channel per table")
        _check_filter(table, channel.filter)
        channels.append(channel)
    return tuple(channels)


def _check_filter(table: _Table, template: str) -> None:
    try:
        fields = [
            (name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
        ]
    except ValueError as exc:
        raise table.refuse(
            "filter",
            f"is not a valid template ({exc}; write {{{{ or }}}} for a brace), got {_show(template)}",
        ) from None
    for name, spec, conversion in fields:
        if name is not None and (name != PLACEHOLDER or spec or conversion):
            raise table.refuse(
                "filter", f"may use only {{{PLACEHOLDER}}} as a placeholder, got {_show(template)}"
            )
    if all(name is None for name, _, _ in fields):
        # Without it every faction's socket would receive every faction's rows.
        raise table.refuse("filter", f"must contain {{{PLACEHOLDER}}}, got {_show(template)}")


def _publish_types(publish: _Table) -> tuple[str, ...]:
    types = publish.value("types")
    if isinstance(types, tuple):  # the default
        return types
    if not isinstance(types, list) or not all(isinstance(t, str) and t.isidentifier() for t in types):
        raise publish.refuse("types", f"must be an array of event type names, got {types!r}")
    if "postgres_changes" in types:
        # Upstream rows are the relay's to vouch for: a client must not be able to forge one.
        raise publish.refuse("types", "must not include postgres_changes")
    return tuple(types)


def _trusted_proxies(server: _Table) -> tuple[str, ...]:
    addresses = server.value("trusted_proxies")
    if isinstance(addresses, tuple):  # the default
        return addresses
    if not isinstance(addresses, list):
        raise server.refuse(
            "trusted_proxies",
            f"must be an array of IP addresses, got {_show(addresses)} ({_kind(addresses)})",
        )
    parsed: list[str] = []
    for index, entry in enumerate(addresses):
        try:
            # Only strings: ip_address() would also take an integer as an IPv4 address.
            address = ipaddress.ip_address(entry) if isinstance(entry, str) else None
        except ValueError:
            address = None
        if address is None:
            raise server.refuse(
                "trusted_proxies",
                f"must be an array of IP addresses (one per proxy, no networks); entry {index} is {_show(entry)}",
            )
        # The spelling the socket reports a peer in (::1, not 0:0:0:0:0:0:0:1), since that is what is compared.
        parsed.append(str(address))
    return tuple(parsed)


def _api_keys(auth: _Table) -> tuple[str, ...]:
    keys = auth.value("api_keys")
    if isinstance(keys, tuple):  # the default
        return keys
    # Entries are described by position and kind only: they are secrets.
    if not isinstance(keys, list):
        raise auth.refuse("api_keys", f"must be an array of non-empty strings, got {_kind(keys)}")
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            problem = "an empty string" if isinstance(key, str) else _kind(key)
            raise auth.refuse(
                "api_keys", f"must be an array of non-empty strings; entry {index} is {problem}"
            )
    return tuple(keys)


def _logging(table: _Table) -> LoggingConfig:
    log_format = table.string("format")
    if log_format not in LOG_FORMATS:
        raise table.refuse("format", f"must be one of {', '.join(LOG_FORMATS)}, got {_show(log_format)}")
    level = table.string("level")
    if level not in LOG_LEVELS:
        raise table.refuse("level", f"must be one of {', '.join(LOG_LEVELS)}, got {_show(level)}")
    levels = table.value("levels")
    if isinstance(levels, tuple):  # the default
        return LoggingConfig(log_format, level, levels)
    if not isinstance(levels, dict):
        raise table.refuse("levels", _expected("a table of logger = level", levels))
    for name, logger_level in levels.items():
        if logger_level not in LOG_LEVELS:
            raise table.refuse(
                "levels",
                f"gives {name} {_show(logger_level)}; levels are {', '.join(LOG_LEVELS)}"
                ' (quote a dotted logger name: "relay.storage.store" = "DEBUG")',
            )
        if name.startswith("trio-websocket") and logger_level == "DEBUG":
            # It logs the upstream URL it opens, whose query carries the anon key.
            raise table.refuse("levels", "must not set trio-websocket to DEBUG: it would log the anon key")
    return LoggingConfig(log_format, level, tuple(sorted(levels.items())))


class _Table:
    """One TOML table being read: the dataclass it becomes gives the known keys and their defaults.

    Unknown keys are refused before any value is read, so `urll = ...` is reported as itself rather
    than as a missing `url`.
    """

    def __init__(self, prefix: str, table: Mapping[str, object], shape: type[Any], labels: Mapping[str, str]):
        self._prefix = prefix
        self._table = table
        self._labels = labels
        self._defaults: dict[str, object] = {f.name: f.default for f in dataclasses.fields(shape)}
        for key in table:
            if key not in self._defaults:
                # The value is not shown: a mistyped key may well hold a secret (anonkey = "...").
                raise ConfigError(f"unknown key {prefix}.{key} (known here: {', '.join(self._defaults)})")

    def label(self, key: str) -> str:
        dotted = f"{self._prefix}.{key}"
        return self._labels.get(dotted, dotted)

    def refuse(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.label(key)} {problem}")

    def value(self, key: str, *, default: object = dataclasses.MISSING, hint: str = "") -> object:
        if key in self._table:
            return self._table[key]
        if default is dataclasses.MISSING:
            default = self._defaults[key]
        if default is dataclasses.MISSING:
            raise self.refuse(key, f"is not set{hint}")
        return default

    def string(
        self, key: str, *, default: object = dataclasses.MISSING, secret: bool = False, hint: str = ""
    ) -> str:
        value = self.value(key, default=default, hint=hint)
        if not isinstance(value, str):
            raise self.refuse(key, _expected("a string", value, secret=secret))
        if not value.strip():
            raise self.refuse(key, f"must not be empty{hint}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.value(key)
        if not isinstance(value, bool):
            raise self.refuse(key, _expected("a boolean", value))
        return value

    def integer(self, key: str, *, low: int, high: int | None = None) -> int:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int):  # TOML's true is a Python int
            raise self.refuse(key, _expected("an integer", value))
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise self.refuse(key, f"must be {bounds}, got {value}")
        return value

    def rate(self, key: str, *, allow_zero: bool = False) -> float:
        """A finite number of things per second: above 0, or 0 too where 0 means "off"."""
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.refuse(key, _expected("a number per second", value))
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise self.refuse(
                key, f"must be a number {'of 0 or more' if allow_zero else 'above 0'}, got {value!r}"
            )
        return float(value)

    def seconds(self, key: str, *, allow_zero: bool = False) -> float:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.refuse(key, _expected("a number of seconds", value))
        least = "zero or more" if allow_zero else "more than zero"
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise self.refuse(key, f"must be a finite number of seconds, {least}, got {_show(value)}")
        return float(value)


def _expected(what: str, value: object, *, secret: bool = False) -> str:
    if secret:
        return f"must be {what}, got {_kind(value)}"
    return f"must be {what}, got {_show(value)} ({_kind(value)})"


def _kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}
    return kinds.get(type(value), "a table" if isinstance(value, dict) else f"a {type(value).__name__}")


def _show(value: object) -> str:
    """The value as TOML would spell it, on one line and cut short."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str | list | dict):
        shown = json.dumps(value, ensure_ascii=False, default=str)
    else:  # numbers, dates and times read the same in TOML and Python
        shown = str(value)
    return shown if len(shown) <= SHOWN_CHARS else shown[: SHOWN_CHARS - 1] + "…"

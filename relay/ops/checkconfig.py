"""`relay check-config`: the effective configuration as TOML with every secret masked, and the problems
`relay serve` would meet that can be seen without connecting anywhere.

The TOML can be pasted back into relay.toml: every key is there, defaults included, and each secret is
a comment showing only its first characters, so pasting keeps the secrets where they already are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from relay.config import CONFIG_VARIABLE, ENV_KEYS, HELD_AS_PAIRS, SECTIONS, Config, ConfigError, load_config
from relay.ops.offline import DatabaseUnreadable, open_read_only, recorded_schema_version
from relay.storage.database import side_file
from relay.storage.migrations import find_migrations, migrations_dir

SHOWN_SECRET_CHARS: Final = 4
# Below this length the first characters would give away too large a share of the secret.
MIN_SECRET_CHARS_SHOWN: Final = 3 * SHOWN_SECRET_CHARS
HIDDEN: Final = "***"
APIKEY_PARAMETER: Final = re.compile(r"((?:^|&)apikey=)([^&]*)", re.IGNORECASE)
ANON_KEY_VARIABLE: Final = "RELAY_UPSTREAM_ANON_KEY"
# relay.toml's url until the operator sets theirs, and the contract's example: both resolve nowhere,
# so `relay serve` would retry them forever.
PLACEHOLDER_HOSTS: Final = ("YOUR-PROJECT-REF", "<ref>")
# Stands in for a missing anon key on a second attempt, so the problems behind it are found in one run.
ABSENT_KEY: Final = "absent"


@dataclass(frozen=True, slots=True)
class Checked:
    """What `check_config` found: the config when it could be loaded at all, and every problem."""

    config: Config | None
    problems: list[str] = field(default_factory=list)
    anon_key_missing: bool = False


def check_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Checked:
    """Load as `relay serve` does; when only the anon key is missing, look for the other problems too."""
    environ = os.environ if environ is None else environ
    try:
        config = load_config(path, environ=environ)
    except ConfigError as first:
        if environ.get(ANON_KEY_VARIABLE):
            return Checked(None, [str(first)])
        try:
            config = load_config(path, environ=environ, overrides={ANON_KEY_VARIABLE: ABSENT_KEY})
        except ConfigError as second:
            return Checked(None, list(dict.fromkeys([str(first), str(second)])))
        return Checked(config, [str(first), *offline_problems(config, environ)], anon_key_missing=True)
    return Checked(config, offline_problems(config, environ))


def offline_problems(config: Config, environ: Mapping[str, str]) -> list[str]:
    """What would stop `relay serve`, or leave it retrying forever, that shows without connecting: the
    example URL left in place; a storage folder that cannot be created or written, a database that
    cannot be read or is newer than this relay (checked as the user running the check)."""
    problems = [
        f"{_label('upstream.url', environ)} still names the example project ({placeholder}): "
        "put your project's Realtime URL there"
        for placeholder in PLACEHOLDER_HOSTS
        if placeholder in config.upstream.url
    ]
    return problems + database_problems(config.storage.path, _label("storage.path", environ))


def database_problems(path: Path, label: str) -> list[str]:
    problems = storage_problems(path, label)
    if problems or not path.is_file():
        return problems  # a database that does not exist yet is created at start-up
    try:
        connection, _ = open_read_only(path)
        try:
            version = recorded_schema_version(connection, path)
        finally:
            connection.close()
    except DatabaseUnreadable as exc:
        return [f"{label}: {exc}"]
    newest = find_migrations(migrations_dir())[-1].version
    if version > newest:
        return [
            f"{label}: {path} has schema version {version}, newer than this relay supports ({newest}); "
            "upgrade the relay"
        ]
    return []


def storage_problems(path: Path, label: str) -> list[str]:
    try:
        return _storage_problems(path, label)
    except OSError as exc:  # a folder on the way that this user may not even look into
        return [f"{label}: cannot look at {path}: {exc.strerror or exc}"]


def _storage_problems(path: Path, label: str) -> list[str]:
    if path.exists() and not path.is_file():
        return [f"{label}: {path} is not a file"]
    existing = path.parent
    while not existing.exists():  # the relay creates the missing folders: the first existing one matters
        existing = existing.parent
    if not existing.is_dir():
        return [f"{label}: cannot create the folder {path.parent}: {existing} is not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{label}: this user cannot create files in the folder {existing}"]
    return [
        f"{label}: this user cannot write {candidate}"
        for candidate in (path, side_file(path, "-wal"), side_file(path, "-shm"))
        if candidate.exists() and not os.access(candidate, os.R_OK | os.W_OK)
    ]


def render(
    config: Config, environ: Mapping[str, str] | None = None, *, anon_key_missing: bool = False
) -> str:
    """The effective configuration as relay.toml, with where each overridden value came from."""
    environ = os.environ if environ is None else environ
    if config.source is None:
        source = (
            f"# No config file was read (pass --config or set {CONFIG_VARIABLE}): defaults and environment."
        )
    else:
        named = f" (from {CONFIG_VARIABLE})" if environ.get(CONFIG_VARIABLE) else ""
        source = f"# The effective configuration of {config.source}{named}."
    lines = [
        source,
        "# Environment variables win over the file; each value they set says so. Secrets are masked and",
        "# commented out: paste this back and keep your own anon_key and api_keys lines.",
    ]
    for name in SECTIONS:
        lines += ["", f"[{name}]"]
        lines += _table_lines(name, getattr(config, name), environ, anon_key_missing=anon_key_missing)
    return "\n".join(lines) + "\n"


def _table_lines(
    prefix: str, values: Any, environ: Mapping[str, str], *, anon_key_missing: bool
) -> list[str]:
    lines, nested = [], []
    for item in dataclasses.fields(values):
        value = getattr(values, item.name)
        dotted = f"{prefix}.{item.name}"
        if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for entry in value:  # arrays of tables come after the table's own keys, as TOML requires
                nested += ["", f"[[{dotted}]]", *_table_lines(dotted, entry, environ, anon_key_missing=False)]
            continue
        notes = list(_notes(dotted, item, value, environ))
        if dotted == "upstream.anon_key" and anon_key_missing:
            line, notes = f"# {item.name} is not set", [f"set {ANON_KEY_VARIABLE}"]
        elif not item.repr and value:  # declared repr=False in config.py: a secret
            line = f"# {item.name} = {_toml(_masked(value))}"
            notes.insert(0, f"masked, {_amount(value)}")
            if dotted == "upstream.anon_key" and not notes[-1].startswith("from "):
                notes.append(f"better set as {ANON_KEY_VARIABLE}")
        elif dotted in HELD_AS_PAIRS:
            pairs = ", ".join(f"{_toml(name)} = {_toml(level)}" for name, level in value)
            line = f"{item.name} = {{{' ' + pairs + ' ' if pairs else ''}}}"
        else:
            line = f"{item.name} = {_toml(mask_url(value) if item.name.endswith('url') else value)}"
        lines.append(f"{line}  # {'; '.join(notes)}" if notes else line)
    return lines + nested


def _notes(
    dotted: str, item: dataclasses.Field[Any], value: object, environ: Mapping[str, str]
) -> Iterator[str]:
    variable = _label(dotted, environ)
    if variable != dotted:
        yield f"from {variable}"
    default = item.default
    if default is not dataclasses.MISSING and value != default and item.repr:
        yield "default {}" if dotted in HELD_AS_PAIRS else f"default {_toml(default)}"


def _label(dotted: str, environ: Mapping[str, str]) -> str:
    """The variable that set `dotted`, as config.py's refusals name it, or the key itself."""
    return next((name for name, key in ENV_KEYS.items() if key == dotted and name in environ), dotted)


def mask(secret: str) -> str:
    """Enough of a secret to tell which one it is, never the whole: "eyJh…"."""
    if len(secret) < MIN_SECRET_CHARS_SHOWN:
        return HIDDEN
    return secret[:SHOWN_SECRET_CHARS] + "…"


def mask_url(value: object) -> object:
    """A URL with its password and any `apikey` query value masked. config.py already refuses a query
    in either URL it reads; a password (wss://user:secret@host) it lets through, and it is masked here."""
    if not isinstance(value, str):
        return value
    parts = urllib.parse.urlsplit(value)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", f":{HIDDEN}@", 1)
    query = APIKEY_PARAMETER.sub(
        lambda found: found[1] + mask(urllib.parse.unquote_plus(found[2])), parts.query
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _masked(value: object) -> object:
    if isinstance(value, str):
        return mask(value)
    return [mask(item) for item in value] if isinstance(value, tuple | list) else HIDDEN


def _amount(value: object) -> str:
    if isinstance(value, str):
        return f"{len(value)} characters"
    return f"{len(value)} keys" if isinstance(value, tuple | list) else "hidden"


def _toml(value: object) -> str:
    """A value as TOML spells it. JSON's string escapes are TOML's, except that TOML wants DEL escaped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # config.py refuses inf and nan, the floats TOML spells differently
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")

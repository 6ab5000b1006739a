"""The fake's model of the project's database as Realtime sees it: tables and their rows, the
change records a mutation produces (reference 6), and the bindings and filters that route them (4, 7).

Pure data and functions, no sockets: the server in `fake_supabase` owns the protocol, and a REST
endpoint over the same rows can be built on `Table` too. Like the server, this never imports the
relay's own protocol code.
"""

from __future__ import annotations

import copy
import json
import operator
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

BINDING_ID_MASK = 2**27 - 1
CHANGE_TYPES = ("INSERT", "UPDATE", "DELETE")
FILTER_OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
ORDERINGS: dict[str, Callable[[Any, Any], Any]] = {
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}
# Join errors after which the real server also disconnects the whole socket with 1001 (4.2, 12).
NO_PARAMS = "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "
NOT_ENABLED = (
    "Unable to subscribe to changes with given parameters. "
    "Please check Realtime is enabled for the given connect parameters: "
)
BAD_PARAMS = (
    "Unable to subscribe to changes with given parameters. "
    "An exception happened so please check your connect parameters: "
)

WAR_CALLS_COLUMNS = {
    "id": "int8",
    "faction_id": "int8",
    "war_id": "int8",
    "target_id": "int8",
    "target_name": "text",
    "caller_id": "int8",
    "caller_name": "text",
    "created_at": "timestamptz",
}
# As today's script writes a chat message (POST /rest/v1/faction_messages).
FACTION_MESSAGES_COLUMNS = {
    "id": "int8",
    "faction_id": "int8",
    "sender_id": "int8",
    "sender_name": "text",
    "message": "text",
    "created_at": "timestamptz",
}
# torn-cat's supabase/schema.sql (one row per faction and war: faction_id, enemy_faction_id), plus the
# columns today's script reads and writes (war_id, is_active, attacker/defender_faction_id).
WARS_COLUMNS = {
    "id": "int8",
    "war_id": "int8",
    "faction_id": "int8",
    "enemy_faction_id": "int8",
    "attacker_faction_id": "int8",
    "defender_faction_id": "int8",
    "is_active": "bool",
    "status": "text",
    "started_at": "timestamptz",
    "ended_at": "timestamptz",
    "created_at": "timestamptz",
}

# What `apply_rls` (supabase/realtime, migration 20260709120000_fix_apply_rls_filter_role_leak) puts in
# `errors` when it cannot send the change whole. Over `poll_max_record_bytes` (1 MiB by default) it keeps
# only the values of at most 64 bytes (as text) in `record` and `old_record`.
PAYLOAD_TOO_LARGE = "Error 413: Payload Too Large"
NO_PRIMARY_KEY = "Error 400: Bad Request, no primary key"
UNAUTHORIZED = "Error 401: Unauthorized"  # the role cannot SELECT the primary key
MAX_RECORD_BYTES = 1_048_576
KEPT_VALUE_BYTES = 64
# Postgres moves a long value out of the row (TOAST) once the row passes about 2 kB
# (TOAST_TUPLE_THRESHOLD); wal2json then leaves it out of an UPDATE that did not change it ("don't send
# unchanged TOAST Datum"), and apply_rls can put it back only from a FULL identity's old row. Real
# Postgres compresses first, so a compressible value stays inline longer: the fake counts raw text.
TOAST_BYTES = 2_000

Row: TypeAlias = dict[str, Any]
ReplicaIdentity: TypeAlias = Literal["default", "full"]
ChangeType: TypeAlias = Literal["INSERT", "UPDATE", "DELETE"]


def binding_id(entry: Mapping[str, Any]) -> int:
    """A pure function of the entry's content, like the server's `phash2` (4.2); not its value."""
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    return zlib.crc32(canonical.encode()) & BINDING_ID_MASK


def commit_timestamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def inspect_params(params: Mapping[str, Any]) -> str:
    """Roughly how Elixir prints a map, as the real error messages quote the params."""
    items = ", ".join(
        f"{json.dumps(k)} => {'nil' if v is None else json.dumps(v)}" for k, v in params.items()
    )
    return f"%{{{items}}}"


# --- tables and filters (6, 7) ---------------------------------------------------------------------


def infer_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int8"
    if isinstance(value, float):
        return "float8"
    if isinstance(value, dict | list):
        return "jsonb"
    return "text"


@dataclass(eq=False)
class Table:
    name: str
    key: str
    replica_identity: ReplicaIdentity
    columns: dict[str, str]  # name -> Postgres type, in table order
    rows: dict[Any, Row] = field(default_factory=dict)
    # Row level security on: a DELETE's old_record keeps only the primary key even under FULL, while
    # the channel filters still see the whole identity (apply_rls: "if RLS enabled, we can't secure
    # deletes so filter to pkey"), so the DELETE still reaches the faction's filtered channel.
    rls: bool = False

    def key_of(self, row: Mapping[str, Any]) -> Any:
        if row.get(self.key) is None:
            raise ValueError(f"{self.name}: a row needs its key column {self.key!r}")
        return row[self.key]

    def row(self, key_value: Any) -> Row:
        try:
            return self.rows[key_value]
        except KeyError:
            raise KeyError(f"{self.name}: no row with {self.key} = {key_value!r}") from None

    def learn_columns(self, row: Mapping[str, Any]) -> None:
        for name, value in row.items():
            self.columns.setdefault(name, infer_type(value))

    def identity(self, old: Row) -> Row:
        """What the WAL carries of the previous row under this table's replica identity (6.2): what
        the channel filters of an UPDATE's or DELETE's old row are evaluated on."""
        if self.replica_identity == "full":
            return copy.deepcopy(old)
        return {self.key: old[self.key]}

    def old_record(self, old: Row, change: ChangeType = "UPDATE") -> Row:
        """The `old_record` sent: the identity, less all but the key for a DELETE under RLS."""
        identity = self.identity(old)
        if self.rls and change == "DELETE":
            return {self.key: identity[self.key]}
        return identity

    def new_record(self, new: Row, old: Row | None, toast_bytes: int | None) -> Row:
        """The `record` sent: under DEFAULT identity an UPDATE leaves out each unchanged value longer
        than `toast_bytes` (None: no TOAST modelled); a FULL identity's old row puts it back."""
        record = copy.deepcopy(new)
        if old is None or toast_bytes is None or self.replica_identity == "full":
            return record
        return {
            name: value
            for name, value in record.items()
            if not (name in old and old[name] == value and _text_bytes(value) > toast_bytes)
        }

    def change_data(
        self,
        change: ChangeType,
        *,
        new: Row | None,
        old: Row | None,
        toast_bytes: int | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": "public",
            "table": self.name,
            "commit_timestamp": commit_timestamp(datetime.now(UTC)),
            "type": change,
            "columns": [{"name": name, "type": kind} for name, kind in self.columns.items()],
            "errors": None,
        }
        # INSERT has no old_record key and DELETE no record key at all, not empty ones (6.1).
        if new is not None:
            data["record"] = self.new_record(new, old, toast_bytes)
        if old is not None:
            data["old_record"] = self.old_record(old, change)
        # apply_rls measures the WAL record (new values and identity) before it builds the message.
        wal_bytes = _text_bytes(new or {}) + (_text_bytes(self.identity(old)) if old is not None else 0)
        if wal_bytes > max_record_bytes:
            for records in ("record", "old_record"):
                if records in data:
                    data[records] = {
                        name: value
                        for name, value in data[records].items()
                        if _text_bytes(value) <= KEPT_VALUE_BYTES
                    }
            data["errors"] = [PAYLOAD_TOO_LARGE]
        return data

    def error_data(self, change: ChangeType, error: str) -> dict[str, Any]:
        """An INSERT's or UPDATE's `Error 400`/`Error 401` record: no row and no commit time."""
        data: dict[str, Any] = {
            "schema": "public",
            "table": self.name,
            "commit_timestamp": None,
            "type": change,
            "columns": [],
            "errors": [error],
            "record": {},
        }
        if change == "UPDATE":
            data["old_record"] = {}
        return data


def _text_bytes(value: Any) -> int:
    # `octet_length(value::text)` of the jsonb value, which jsonb prints with ", " and ": ".
    return len(json.dumps(value, ensure_ascii=False).encode())


def filter_text(value: Any) -> str:
    # Postgres casts the filter text to the column's type; comparing with the value's own text form
    # gives the same answer for the int, text and bool columns used here.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def ordered(left: str, right: str) -> tuple[float, float] | tuple[str, str]:
    try:
        return float(left), float(right)
    except ValueError:
        return left, right


class SubscriptionError(Exception):
    """The message of the `postgres_changes` system error that replaces "Subscribed" (5.2)."""


@dataclass(frozen=True)
class Filter:
    column: str
    op: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Filter | None:
        if not text.strip():
            return None  # an empty filter is no filter (7)
        column, _, rest = text.partition("=")
        parts = rest.split(".", 1)
        if len(parts) != 2 or parts[0] not in FILTER_OPERATORS or not column:
            raise SubscriptionError(f"Error parsing `filter` params: {json.dumps(parts)}")
        op, value = parts
        if op != "in":
            return cls(column, op, (value,))
        if not (value.startswith("(") and value.endswith(")")):
            raise SubscriptionError(
                'Error parsing `filter` params: "`in` filter value must be wrapped by parentheses"'
            )
        return cls(column, op, tuple(value[1:-1].split(",")))

    def matches(self, row: Mapping[str, Any]) -> bool:
        # A missing column (a key-only old_record) or NULL satisfies no operator (7).
        if row.get(self.column) is None:
            return False
        actual = filter_text(row[self.column])
        if self.op == "in":
            return actual in self.values
        if self.op in ("eq", "neq"):
            return (actual == self.values[0]) == (self.op == "eq")
        left, right = ordered(actual, self.values[0])
        return bool(ORDERINGS[self.op](left, right))


@dataclass(frozen=True)
class Binding:
    id: int
    event: str  # INSERT, UPDATE, DELETE or *
    table: str  # a table name or *
    filter: Filter | None

    def wants(self, table: str, change: ChangeType) -> bool:
        return self.table in ("*", table) and self.event in ("*", change)


def parse_binding(entry: Mapping[str, Any], tables: Mapping[str, Table]) -> Binding:
    """One `postgres_changes` entry as the server accepts it (4.1), or the error it reports (5.2)."""
    schema, table, raw_filter = entry.get("schema"), entry.get("table"), entry.get("filter", "")
    has_filter = "filter" in entry
    accepted = (
        (isinstance(schema, str) and isinstance(table, str) and isinstance(raw_filter, str))
        or (isinstance(schema, str) and "table" not in entry and not has_filter)
        or ("schema" not in entry and isinstance(table, str) and not has_filter)
    )
    if not accepted:
        raise SubscriptionError(NO_PARAMS + inspect_params(entry))
    schema = "public" if schema is None else schema
    table = "*" if table is None else table
    event = str(entry.get("event", "*")).upper()
    filter_ = Filter.parse(raw_filter)
    if schema not in ("public", "*") or (table != "*" and table not in tables):
        raise SubscriptionError(
            f"{NOT_ENABLED}[event: {event}, schema: {schema}, table: {table}, filters: {raw_filter}]"
        )
    if filter_ is not None and table != "*" and filter_.column not in tables[table].columns:
        raise SubscriptionError(
            f"{BAD_PARAMS}[schema: {schema}, table: {table}, filters: {raw_filter}]. "
            f"Exception: ERROR 42703 (undefined_column) column {filter_.column} does not exist"
        )
    return Binding(binding_id(entry), event if event in CHANGE_TYPES else "*", table, filter_)

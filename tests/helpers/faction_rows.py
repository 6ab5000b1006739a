"""Faction rows held in a dict: a `relay.storage.state.Lookup` for the planner's pure tests (the store
itself reads them from the database)."""

from __future__ import annotations

from collections.abc import Iterable

from relay.storage.state import Row, RowChange, RowKey


class FactionRows:
    """Rows by faction, table and key, and which faction holds a (table, key): the route for a
    DELETE that arrives without its faction."""

    def __init__(self, stored: Iterable[tuple[int, str, RowKey, Row]] = ()) -> None:
        self._rows: dict[tuple[int, str], dict[RowKey, Row]] = {}
        self._owners: dict[tuple[str, RowKey], int] = {}
        for faction_id, table, key, row in stored:
            self.apply(RowChange(faction_id, table, key, row))

    def get(self, faction_id: int, table: str, key: RowKey) -> Row | None:
        return self._rows.get((faction_id, table), {}).get(key)

    def owner(self, table: str, key: RowKey) -> int | None:
        return self._owners.get((table, key))

    def rows(self, faction_id: int, table: str) -> dict[RowKey, Row]:
        return self._rows.get((faction_id, table), {})

    def count(self) -> int:
        return len(self._owners)

    def apply(self, change: RowChange) -> None:
        rows = self._rows.setdefault((change.faction_id, change.table), {})
        if change.row is None:
            rows.pop(change.key, None)
            if self._owners.get((change.table, change.key)) == change.faction_id:
                del self._owners[(change.table, change.key)]
        else:
            rows[change.key] = change.row
            self._owners[(change.table, change.key)] = change.faction_id

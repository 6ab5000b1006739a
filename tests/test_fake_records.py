"""The fake's change records against the real server's shapes (apply_rls in supabase/realtime, wal2json):
what RLS, the replica identity, TOAST and the record size limit leave in `record` and `old_record`."""

from __future__ import annotations

import pytest

from relay.testing.fake_supabase import FakeSupabase
from relay.testing.fake_tables import (
    NO_PRIMARY_KEY,
    PAYLOAD_TOO_LARGE,
    TOAST_BYTES,
    UNAUTHORIZED,
    WAR_CALLS_COLUMNS,
    Table,
)

pytestmark = pytest.mark.unit

ROW = {"id": 7, "faction_id": 46666, "target_id": 3001, "target_name": "x" * 3000}


def table(replica_identity: str = "default", *, rls: bool = False) -> Table:
    return Table("war_calls", "id", replica_identity, dict(WAR_CALLS_COLUMNS), rls=rls)  # type: ignore[arg-type]


def test_new_tables_have_the_default_replica_identity_and_no_rls() -> None:
    fake = FakeSupabase()
    deleted = fake._tables["war_calls"].change_data("DELETE", new=None, old=ROW)
    assert deleted["old_record"] == {"id": 7}
    assert fake.toast_bytes is None  # off unless a test turns it on
    assert fake.error_records is None


@pytest.mark.parametrize(
    ("replica_identity", "rls", "old_record"),
    [
        ("default", False, {"id": 7}),
        ("full", False, ROW),
        ("full", True, {"id": 7}),  # "if RLS enabled, we can't secure deletes so filter to pkey"
    ],
)
def test_a_deletes_old_record(replica_identity: str, rls: bool, old_record: dict[str, object]) -> None:
    subject = table(replica_identity, rls=rls)
    assert subject.change_data("DELETE", new=None, old=ROW)["old_record"] == old_record
    # The filters are evaluated on the identity, which RLS does not narrow.
    assert subject.identity(ROW) == (ROW if replica_identity == "full" else {"id": 7})


def test_rls_leaves_an_updates_old_record_whole_under_full() -> None:
    assert table("full", rls=True).change_data("UPDATE", new=ROW, old=ROW)["old_record"] == ROW


@pytest.mark.parametrize(("replica_identity", "left_out"), [("default", True), ("full", False)])
def test_an_update_leaves_out_an_unchanged_long_value_under_default_identity(
    replica_identity: str, left_out: bool
) -> None:
    new = {**ROW, "target_id": 9}
    record = table(replica_identity).change_data("UPDATE", new=new, old=ROW, toast_bytes=TOAST_BYTES)[
        "record"
    ]
    assert ("target_name" not in record) is left_out
    assert record["target_id"] == 9
    # A changed long value is always sent, and an INSERT is always whole.
    changed = {**ROW, "target_name": "y" * 3000}
    sent = table().change_data("UPDATE", new=changed, old=ROW, toast_bytes=TOAST_BYTES)["record"]
    assert sent == changed
    assert table().change_data("INSERT", new=ROW, old=None, toast_bytes=TOAST_BYTES)["record"] == ROW


def test_a_record_over_the_size_limit_keeps_only_short_values_and_says_413() -> None:
    data = table("full").change_data("UPDATE", new={**ROW, "target_id": 9}, old=ROW, max_record_bytes=1_000)
    assert data["errors"] == [PAYLOAD_TOO_LARGE]
    assert data["record"] == {"id": 7, "faction_id": 46666, "target_id": 9}
    assert data["old_record"] == {"id": 7, "faction_id": 46666, "target_id": 3001}
    assert data["commit_timestamp"] is not None
    assert {"name": "target_name", "type": "text"} in data["columns"]
    small = table().change_data("UPDATE", new={"id": 7}, old={"id": 7}, max_record_bytes=1_000)
    assert small["errors"] is None


@pytest.mark.parametrize("error", [NO_PRIMARY_KEY, UNAUTHORIZED])
def test_a_record_without_a_row(error: str) -> None:
    inserted = table().error_data("INSERT", error)
    assert inserted == {
        "schema": "public",
        "table": "war_calls",
        "commit_timestamp": None,
        "type": "INSERT",
        "columns": [],
        "errors": [error],
        "record": {},
    }
    assert table().error_data("UPDATE", error)["old_record"] == {}

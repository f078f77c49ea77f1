"""tuneloop/feedback_store.py in process, on SQLite and on a real PostgreSQL server: joins, idempotence, pending
feedback, row marks, pruning, reopening, migrations."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tuneloop.database import redact
from tuneloop.errors import StoreError
from tuneloop.events import FeedbackEvent, PredictionEvent
from tuneloop.feedback_store import MIGRATIONS, FeedbackStore
from tuneloop.store_backends import open_database


def prediction(request_id: str, label: str = "negative", version: int = 1, shadow: bool = False,
               timestamp: str = "2026-11-29T10:00:00.000+00:00") -> PredictionEvent:
    return PredictionEvent(request_id=request_id, text=f"text of {request_id}", label=label,
                           scores={label: 0.9}, model_version=version, shadow=shadow, timestamp=timestamp)


def feedback(feedback_id: str, label: str = "positive", request_id: str | None = None, text: str | None = None
             ) -> FeedbackEvent:
    return FeedbackEvent(feedback_id=feedback_id, label=label, request_id=request_id,
                         text=text if text is not None or request_id else f"typed {feedback_id}")


@pytest.fixture
def store(store_url: str) -> Iterator[FeedbackStore]:
    opened = FeedbackStore(store_url)
    yield opened
    opened.close()


def test_feedback_takes_the_served_text_prediction_and_version(store: FeedbackStore) -> None:
    store.write([prediction("r1", version=3)], [])
    result = store.write([], [feedback("f1", request_id="r1", text="what the client says it sent")])
    assert (result.stored, result.pending, result.duplicates) == (1, 0, 0)
    [row] = store.feedback_rows()
    assert (row["text"], row["label"], row["predicted_label"], row["model_version"]) == (
        "text of r1", "positive", "negative", 3)


def test_a_redelivered_batch_stores_nothing_twice(store: FeedbackStore) -> None:
    batch = [feedback("f1"), feedback("f2")]
    assert store.write([prediction("r1")], batch).stored == 2
    again = store.write([prediction("r1")], batch)
    assert (again.stored, again.duplicates) == (0, 2)
    assert (store.count(), store.count("predictions")) == (2, 1)


def test_feedback_before_its_prediction_waits_then_joins(store: FeedbackStore) -> None:
    early = store.write([], [feedback("f1", request_id="r9")])
    assert (early.stored, early.pending) == (0, 1)
    assert store.write([], [feedback("f1", request_id="r9")]).duplicates == 1  # pending counts as known
    assert store.write([prediction("r9", label="neutral")], []).stored == 1
    assert store.count("pending_feedback") == 0
    assert store.feedback_rows()[0]["predicted_label"] == "neutral"


def test_expired_pending_is_listed_oldest_first_and_dropped_on_request(store: FeedbackStore) -> None:
    store.write([], [feedback("a", request_id="ra")])
    time.sleep(0.02)
    store.write([], [feedback("b", request_id="rb")])
    assert store.expired_pending(older_than_s=60) == []
    expired = store.expired_pending(older_than_s=0)
    assert [feedback_id for feedback_id, _ in expired] == ["a", "b"]
    assert FeedbackEvent.model_validate_json(expired[0][1]).request_id == "ra"
    store.drop_pending(["a"])
    assert [feedback_id for feedback_id, _ in store.expired_pending(0)] == ["b"]


def test_row_marks_read_only_what_came_after(store: FeedbackStore) -> None:
    store.write([], [feedback("f1"), feedback("f2")])
    mark = max(int(row["row_id"]) for row in store.feedback_rows())
    store.write([], [feedback("f3")])
    assert [row["feedback_id"] for row in store.feedback_rows(after=mark)] == ["f3"]
    assert store.count_stored_since(None) == 3


def test_shadow_scores_pair_with_the_served_answer_on_the_same_requests(store: FeedbackStore) -> None:
    store.write([prediction("r1", label="negative"), prediction("r1", label="positive", version=2, shadow=True),
                 prediction("r2", label="negative")], [])
    assert store.count("predictions") == 2  # a shadow score is not a served prediction
    store.write([], [feedback("f1", request_id="r1"), feedback("f2", request_id="r2")])
    assert store.shadow_pairs(candidate=2, stored_after="2000-01-01T00:00:00.000+00:00") == [
        ("positive", "negative", "positive")]
    assert sorted(store.labelled_since(1, "2000-01-01T00:00:00.000+00:00")) == [
        ("positive", "negative"), ("positive", "negative")]


def test_pruning_drops_old_predictions_and_keeps_feedback(store: FeedbackStore) -> None:
    store.write([prediction("old", timestamp="2026-01-01T00:00:00.000+00:00"),
                 prediction("old", version=2, shadow=True, timestamp="2026-01-01T00:00:00.000+00:00"),
                 prediction("new", timestamp="2026-11-29T00:00:00.000+00:00")],
                [feedback("f1", request_id="old")])
    assert store.prune_predictions(before="2026-06-01T00:00:00.000+00:00") == 2
    assert (store.count("predictions"), store.count()) == (1, 1)


def test_what_was_written_is_there_after_reopening(store_url: str) -> None:
    first = FeedbackStore(store_url)
    first.write([prediction("r1")], [feedback("f1", request_id="r1"), feedback("f2", request_id="later")])
    first.close()
    reopened = FeedbackStore(store_url)
    assert (reopened.count(), reopened.count("pending_feedback"), reopened.count("predictions")) == (1, 1, 1)
    reopened.close()


def test_an_unknown_table_is_refused(store: FeedbackStore) -> None:
    with pytest.raises(ValueError, match="no table"):
        store.count("feedback; DROP TABLE feedback")


def test_migrations_are_applied_once_and_recorded(store_url: str) -> None:
    for _ in range(2):
        FeedbackStore(store_url).close()
    database = open_database(store_url)
    assert database.schema_versions() == {"feedback_store": 1}
    assert database.execute("SELECT COUNT(*) FROM schema_migrations").scalar() == 1
    database.close()


def test_processes_opening_a_new_store_at_once_migrate_it_once(store_url: str) -> None:
    # The controller and a training run open the store together after a deploy: neither may fail or apply twice.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: FeedbackStore(store_url), range(4)))
    assert stores[0].write([], [feedback("f1")]).stored == 1
    assert all(store.count() == 1 for store in stores)
    for store in stores:
        store.close()
    assert open_database(store_url).execute("SELECT COUNT(*) FROM schema_migrations").scalar() == 1


def test_a_store_from_a_newer_tuneloop_is_refused(store_url: str) -> None:
    FeedbackStore(store_url).close()
    database = open_database(store_url)
    database.execute("INSERT INTO schema_migrations VALUES ('feedback_store', 99, 'from the future', 'now')")
    database.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this tuneloop's .1.; upgrade tuneloop"):
        FeedbackStore(store_url)


def test_a_sqlite_store_from_before_migrations_opens_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0].sql.format(identity="", row_number=""))  # what releases before them created
    old.execute("INSERT INTO feedback VALUES ('f0', NULL, 'kept', 'positive', NULL, NULL, 'api', 't', 't')")
    old.commit()
    old.close()
    store = FeedbackStore(path)
    assert [row["feedback_id"] for row in store.feedback_rows()] == ["f0"]
    assert store.write([], [feedback("f1")]).stored == 1
    store.close()


def test_a_postgresql_store_survives_its_connection_being_cut(postgres: object) -> None:
    # A server restart or failover ends every session; the statement that meets the break fails (the controller
    # retries its batch), the next one reconnects.
    url = postgres.create_database(f"cut_{uuid.uuid4().hex[:12]}")
    store = FeedbackStore(url)
    store.write([], [feedback("f1")])
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid()")
    with pytest.raises(StoreError, match=r"postgresql://tuneloop:\*\*\*@.* failed: terminating connection"):
        store.write([], [feedback("f2")])  # the store's own error, as SQLite's are: callers catch one kind
    assert store.write([], [feedback("f2")]).stored == 1
    assert store.count() == 2
    store.close()


def test_an_unreachable_postgresql_store_is_named_without_its_password() -> None:
    with pytest.raises(StoreError, match=r"cannot reach the store postgresql://tuneloop:\*\*\*@127.0.0.1:1/x") as raised:
        FeedbackStore("postgresql://tuneloop:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(raised.value)


def test_an_unknown_store_url_says_what_is_accepted() -> None:
    with pytest.raises(StoreError, match="a SQLite file path or a postgresql:// URL"):
        FeedbackStore("mysql://somewhere/db")


def test_one_batch_stores_a_repeated_id_once_and_joins_its_own_predictions(store: FeedbackStore) -> None:
    result = store.write([prediction("r1", label="neutral")],
                         [feedback("f1", request_id="r1"), feedback("f1", request_id="r1"), feedback("f2")])
    assert (result.stored, result.duplicates, result.pending) == (2, 1, 0)
    assert {row["feedback_id"]: row["predicted_label"] for row in store.feedback_rows()} == {"f1": "neutral", "f2": None}


def test_postgresql_sessions_detect_a_vanished_peer_within_seconds(postgres: object) -> None:
    # Without keepalives a leader whose host vanished kept its session, and so the controller lock, for the
    # kernel's default (two hours and more): the waiting controller never led.
    database = open_database(postgres.create_database(f"alive_{uuid.uuid4().hex[:12]}"))
    settings = {name: database.execute(f"SHOW {name}").scalar()
                for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")}
    assert settings == {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "3"}
    database.close()


def test_a_store_url_is_shown_without_its_password_wherever_it_is_given() -> None:
    assert redact("postgresql://tuneloop:s3cret@db:5432/x") == "postgresql://tuneloop:***@db:5432/x"
    assert redact("postgresql://db/x?user=t&password=s3cret&sslmode=require") == (
        "postgresql://db/x?user=t&password=***&sslmode=require")
    assert redact("var/feedback.db") == "var/feedback.db"

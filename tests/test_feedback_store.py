"""tuneloop/feedback_store.py in process: joins, idempotence, pending feedback, row marks, pruning, reopening."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneloop.events import FeedbackEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore


def prediction(request_id: str, label: str = "negative", version: int = 1, shadow: bool = False,
               timestamp: str = "2026-11-29T10:00:00.000+00:00") -> PredictionEvent:
    return PredictionEvent(request_id=request_id, text=f"text of {request_id}", label=label,
                           scores={label: 0.9}, model_version=version, shadow=shadow, timestamp=timestamp)


def feedback(feedback_id: str, label: str = "positive", request_id: str | None = None, text: str | None = None
             ) -> FeedbackEvent:
    return FeedbackEvent(feedback_id=feedback_id, label=label, request_id=request_id,
                         text=text if text is not None or request_id else f"typed {feedback_id}")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    opened = FeedbackStore(tmp_path / "store.db")
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


def test_what_was_written_is_there_after_reopening(tmp_path: Path) -> None:
    first = FeedbackStore(tmp_path / "store.db")
    first.write([prediction("r1")], [feedback("f1", request_id="r1"), feedback("f2", request_id="later")])
    first.close()
    reopened = FeedbackStore(tmp_path / "store.db")
    assert (reopened.count(), reopened.count("pending_feedback"), reopened.count("predictions")) == (1, 1, 1)
    reopened.close()


def test_an_unknown_table_is_refused(store: FeedbackStore) -> None:
    with pytest.raises(ValueError, match="no table"):
        store.count("feedback; DROP TABLE feedback")

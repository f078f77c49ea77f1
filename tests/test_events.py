"""The bus's message schemas (tuneloop/events.py) and the API's text type built on them."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from services.schemas import Texts
from tuneloop.events import FeedbackEvent, PredictionEvent

# Blank to str.strip(), which load_csv applies: stored as feedback, such a row made the next training run fail.
BLANK = [" ", "\u00a0", "\u2028", "\u0085", "\t\r\n", "\u3000"]


@pytest.mark.parametrize("blank", BLANK)
def test_feedback_needs_a_text_and_a_label_that_are_not_all_whitespace(blank: str) -> None:
    with pytest.raises(ValidationError, match="only whitespace"):
        FeedbackEvent(text=blank, label="positive")
    with pytest.raises(ValidationError, match="only whitespace"):
        FeedbackEvent(text="fine", label=blank)
    assert FeedbackEvent(text=f"{blank}kept as sent{blank}", label="positive").text == f"{blank}kept as sent{blank}"


@pytest.mark.parametrize("blank", BLANK)
def test_a_prediction_request_refuses_a_blank_text(blank: str) -> None:
    with pytest.raises(ValidationError, match="only whitespace"):
        TypeAdapter(Texts).validate_python(["a real sentence", blank])


def test_a_feedback_timestamp_must_be_iso_with_an_offset_and_is_stored_in_utc() -> None:
    # The client-written timestamp went into the store unchecked, where timestamps are compared as strings.
    event = FeedbackEvent(text="fine", label="positive", timestamp="2026-11-29T10:00:00+02:00")
    assert event.timestamp == "2026-11-29T08:00:00.000+00:00"
    for bad in ("yesterday", "2026-11-29T10:00:00", "2026-13-01T00:00:00+00:00"):
        with pytest.raises(ValidationError, match="timestamp"):
            FeedbackEvent(text="fine", label="positive", timestamp=bad)


def test_a_nul_character_is_refused_in_texts_labels_and_sources(store_url: str) -> None:
    # PostgreSQL's text type cannot hold U+0000: accepted, such feedback failed its batch on every retry, and the
    # controller stalled on it. The boundary refuses it, on every backend alike.
    from tuneloop.feedback_store import FeedbackStore

    for fields in ({"text": "a\x00b", "label": "positive"}, {"text": "fine", "label": "pos\x00"},
                   {"text": "fine", "label": "positive", "source": "app\x00"}):
        with pytest.raises(ValidationError, match="NUL"):
            FeedbackEvent(**fields)
    with pytest.raises(ValidationError, match="NUL"):
        TypeAdapter(Texts).validate_python(["a real sentence", "a\x00b"])
    store = FeedbackStore(store_url)  # what passes the boundary is stored
    assert store.write([], [FeedbackEvent(text="tab\tand \u2028 separators, \u00e9t\u00e9", label="positive")]).stored == 1
    store.close()


def test_a_prediction_event_with_a_nul_character_is_refused() -> None:
    # Such events (queued by a release before the boundary refused U+0000) failed their batch in PostgreSQL on
    # every retry; refused by the schema, they are dead-lettered as malformed.
    for fields in ({"text": "a\x00b"}, {"label": "neg\x00"}, {"request_id": "r\x00"}):
        with pytest.raises(ValidationError, match="NUL"):
            PredictionEvent(**({"request_id": "r1", "text": "t", "label": "neg", "scores": {"neg": 1.0},
                                "model_version": 1} | fields))

"""The bus's message schemas (tuneloop/events.py) and the API's text type built on them."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from services.schemas import Texts
from tuneloop.events import FeedbackEvent

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

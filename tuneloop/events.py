"""What travels on the bus: JSON messages, validated on both ends by these schemas."""

from __future__ import annotations

import hashlib
import uuid
import warnings
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from tuneloop.clock import utc_iso, utc_now
from tuneloop.rollout_stage import RolloutStage


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("contains a NUL character (U+0000), which no store keeps (PostgreSQL's text cannot); remove it")
    return text


NoNul = Annotated[str, AfterValidator(_no_nul)]


def new_id() -> str:
    return uuid.uuid4().hex


class PredictionEvent(BaseModel):
    request_id: NoNul
    text: NoNul
    label: NoNul
    scores: dict[str, float]
    model_version: int
    timestamp: str = Field(default_factory=utc_now)
    # What the drift statistics need beyond the scores; absent from backends that cannot give them.
    sketch: list[float] = Field(default_factory=list, description="The model's embedding sketch of the text.")
    tokens: int | None = Field(None, description="Tokens after truncation, special tokens included.")
    unknown_tokens: int | None = Field(None, description="Of those, how many are the unknown token.")
    shadow: bool = Field(
        False, description="Scored by a candidate in shadow and not returned; request_id is the served prediction's."
    )
    abstained: bool = Field(
        False, description="Answered `label: null`: the top score was below serve.abstain_below, or the top label is "
        "serve.out_of_scope_label (`label` is the top label)."
    )


Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


def _visible(text: str) -> str:
    if not text or text.isspace():
        raise ValueError("is empty or only whitespace; send the text (or label) itself")
    return _no_nul(text)


# A text or label needs one character that is not whitespace (U+00A0, U+2028 and the like count as whitespace):
# a blank one cannot be trained on, and stored as feedback it made the next training run fail. Put it after any
# length constraint, whose own message ("at most 2000 characters") it would otherwise replace. It refuses U+0000 too.
NOT_BLANK = AfterValidator(_visible)
VisibleText = Annotated[str, StringConstraints(min_length=1), NOT_BLANK]


class FeedbackEvent(BaseModel):
    """One labelled example sent back by an application."""

    model_config = ConfigDict(extra="forbid")

    feedback_id: Identifier = Field(default_factory=new_id, description="Deduplication key; a resend stores nothing twice.")
    request_id: Identifier | None = Field(None, description="The prediction this labels; its text is joined in.")
    text: VisibleText | None = Field(None, description="Needed without request_id.")
    label: VisibleText
    source: Annotated[NoNul, StringConstraints(max_length=128)] = "api"
    timestamp: str = Field(default_factory=utc_now, description="When it was labelled: ISO 8601 with an offset.")

    @field_validator("timestamp")
    @classmethod
    def iso_with_offset(cls, value: str) -> str:
        """Stored in the store's one format (UTC, milliseconds), where timestamps are compared as strings."""
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"timestamp {value!r} is not ISO 8601 (2026-11-29T10:00:00+00:00)") from None
        if moment.tzinfo is None:
            raise ValueError(f"timestamp {value!r} has no UTC offset; add one (+00:00)")
        return utc_iso(moment)

    @model_validator(mode="after")
    def needs_request_id_or_text(self) -> FeedbackEvent:
        if self.request_id is None and self.text is None:
            raise ValueError("feedback needs a request_id (of a served prediction) or the text it labels")
        return self


# A dead letter quotes at most this many characters of its message: enough to read what went wrong, and
# bounded, so that the letter itself always fits the bus (JSON escapes a character to at most 6 bytes).
DEAD_LETTER_RAW_CHARS = 65_536


class DeadLetter(BaseModel):
    topic: str
    reason: str
    raw: str = Field(description=f"The message as text, its first {DEAD_LETTER_RAW_CHARS:,} characters.")
    raw_bytes: int | None = Field(None, description="The whole message's size.")
    raw_sha256: str | None = Field(None, description="The whole message's hash, to match it with its source.")
    timestamp: str = Field(default_factory=utc_now)

    @classmethod
    def of(cls, topic: str, raw: bytes, reason: str) -> DeadLetter:
        text = raw.decode("utf-8", errors="replace")
        return cls(topic=topic, reason=reason, raw=text[:DEAD_LETTER_RAW_CHARS], raw_bytes=len(raw),
                   raw_sha256=hashlib.sha256(raw).hexdigest())

    def encoded(self) -> bytes:
        return self.model_dump_json().encode()


class ModelEvent(BaseModel):
    """The registry changed: replicas reload what it says. The registry, not the event, holds the truth."""

    action: Literal["promote", "rollback", RolloutStage, "withdraw"]
    version: int
    previous: int | None = None
    reason: str = ""
    timestamp: str = Field(default_factory=utc_now)

    @field_validator("action", mode="before")
    @classmethod
    def _withdraw_was_abort(cls, action: object) -> object:
        if action == "abort":  # sent by the previous release; read until the next one
            warnings.warn("model event action `abort` is `withdraw` since this release", FutureWarning, stacklevel=2)
            return "withdraw"
        return action

"""What the service's HTTP API takes and returns: request limits, responses, the /model summary."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from services.settings import limits
from tuneloop.events import NOT_BLANK, FeedbackEvent
from tuneloop.rollout_stage import RolloutStage

NOT_LOADED = "no verified model is loaded yet; check /readyz, and run `tuneloop bootstrap` if the registry is empty"

Text = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_chars_per_text), NOT_BLANK]
Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_texts_per_request)]


class Prediction(BaseModel):
    request_id: str = Field(description="Identifies this prediction; send it back with feedback.")
    label: str | None = Field(
        description="The predicted label; null when the service abstained (`abstained`): the text's top score was "
        "below `serve.abstain_below`, as out-of-scope texts' are, or the top label is `serve.out_of_scope_label`.")
    top_label: str = Field(description="The label of the highest score, abstained or not.")
    abstained: bool = Field(description="True when the service withheld the label (`label` is null).")
    scores: dict[str, float] = Field(
        description="Probability per label; they sum to 1. Calibrated: the softmax of the logits divided by the "
        "version's temperature, fitted at export on rows training never saw, so a top score of 0.8 is right about "
        "80 % of the time on data like those rows.")
    model_version: int = Field(description="Registry version that served this text.")


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Feedback items made durable.")
    spooled: int = Field(description="Of those, how many wait in the local spool for Kafka to return.")
    feedback_ids: list[str]


FeedbackBatch = Annotated[list[FeedbackEvent], Field(min_length=1, max_length=1000)]


class CandidateInfo(BaseModel):
    version: int
    stage: RolloutStage
    share: float = Field(description="Share of texts the candidate answers (0 in shadow).")


class ModelInfo(BaseModel):
    version: int
    backend: str
    labels: list[str]
    created_at: str
    parent_version: int | None
    base_model: str
    metrics: dict[str, object]
    quantization: str | None
    providers: list[str]
    candidate: CandidateInfo | None = Field(description="A version in shadow or canary next to this one.")

"""Routing in process, on stand-in models: live, canary (with its fall-back), shadow (off the request path)."""

from __future__ import annotations

import threading
from dataclasses import replace
from unittest.mock import MagicMock

import numpy as np
import pytest

from services.follower import Candidate
from services.live_model import LiveModel
from services.routing import Router
from tuneloop.inference import Scores
from tuneloop.registry import Manifest

LABELS = ["neg", "pos"]


class Fixed:
    """Answers every text with one label; optionally fails, or waits for a gate before answering."""

    def __init__(self, label: int, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.label, self.fail, self.gate = label, fail, gate
        self.calls: list[list[str]] = []

    def predict(self, texts: list[str]) -> Scores:
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(texts)
        if self.fail:
            raise RuntimeError("broken candidate")
        probabilities = np.zeros((len(texts), 2), dtype=np.float32)
        probabilities[:, self.label] = 1.0
        return Scores(logits=probabilities, probabilities=probabilities, sketch=np.zeros((len(texts), 2)),
                      tokens=np.full(len(texts), 4), unknown_tokens=np.zeros(len(texts), dtype=int))


def model(version: int, classifier: Fixed) -> LiveModel:
    manifest = Manifest(version=version, created_at="2026-11-29T00:00:00+00:00", base_model="base", labels=LABELS,
                        files={})
    return LiveModel(version, manifest, classifier, "onnx")


def router(shadow_queue: int = 4) -> tuple[Router, MagicMock]:
    publisher = MagicMock()
    return Router(publisher, MagicMock(), shadow_queue), publisher


TEXTS = [f"text {i}" for i in range(40)]


def test_without_a_candidate_the_live_version_answers_and_every_text_becomes_an_event() -> None:
    route, publisher = router()
    predictions = route.predict(model(1, Fixed(1)), None, TEXTS)
    assert [(p.label, p.model_version) for p in predictions] == [("pos", 1)] * len(TEXTS)
    assert len({p.request_id for p in predictions}) == len(TEXTS)
    assert predictions[0].scores == {"neg": 0.0, "pos": 1.0}
    assert [c.args[1] for c in publisher.offer.call_args_list] == TEXTS
    assert not any(c.args[3] for c in publisher.offer.call_args_list)  # none is a shadow score


def test_a_canary_answers_its_share_in_order_and_the_live_version_the_rest() -> None:
    route, _ = router()
    canary = Candidate(model(2, Fixed(0)), "canary", 0.5)
    predictions = route.predict(model(1, Fixed(1)), canary, TEXTS)
    served_by = [p.model_version for p in predictions]
    assert set(served_by) == {1, 2}  # 40 texts at 50 %: both answer (the chance of one only is 2e-12)
    assert all(p.label == ("neg" if p.model_version == 2 else "pos") for p in predictions)


def test_a_failing_canary_falls_back_to_the_live_version_for_the_whole_batch() -> None:
    route, _ = router()
    live = Fixed(1)
    canary = Candidate(model(2, Fixed(0, fail=True)), "canary", 1.0)
    predictions = route.predict(model(1, live), canary, TEXTS)
    assert {p.model_version for p in predictions} == {1}
    assert live.calls == [TEXTS]
    route.metrics.candidate_failures.labels.assert_called_with("canary")


def test_a_shadow_scores_the_served_requests_off_the_request_path_and_never_answers() -> None:
    route, publisher = router()
    shadow = Candidate(model(2, Fixed(0)), "shadow", 0.0)
    predictions = route.predict(model(1, Fixed(1)), shadow, TEXTS)
    assert {p.model_version for p in predictions} == {1}
    route.close()  # waits for the shadow batch
    shadow_events = [c.args for c in publisher.offer.call_args_list if c.args[3]]
    assert [args[0].request_id for args in shadow_events] == [p.request_id for p in predictions]
    assert {args[0].model_version for args in shadow_events} == {2}


def test_a_shadow_that_falls_behind_is_skipped_and_counted() -> None:
    route, _ = router(shadow_queue=1)
    gate = threading.Event()
    shadow = Candidate(model(2, Fixed(0, gate=gate)), "shadow", 0.0)
    live = model(1, Fixed(1))
    route.predict(live, shadow, TEXTS[:3])  # takes the only slot and waits at the gate
    route.predict(live, shadow, TEXTS[:5])
    route.metrics.shadow_skipped.inc.assert_called_once_with(5)
    gate.set()
    route.close()
    route.predict(live, shadow, TEXTS[:2])  # after close: skipped, not raised
    assert route.metrics.shadow_skipped.inc.call_args_list[-1].args == (2,)


class Scored:
    """Answers with fixed probabilities per text, in order."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = np.array(rows, dtype=np.float32)

    def predict(self, texts: list[str]) -> Scores:
        rows = self.rows[: len(texts)]
        return Scores(logits=np.log(rows), probabilities=rows, sketch=np.zeros((len(texts), 2)))


def test_a_text_below_the_threshold_is_answered_without_a_label_and_counted() -> None:
    route, publisher = router()
    live = replace(model(1, Scored([[0.3, 0.7], [0.05, 0.95], [0.6, 0.4]])), abstain_below=0.75)
    predictions = route.predict(live, None, ["unsure", "sure", "unsure too"])
    assert [(p.label, p.top_label, p.abstained) for p in predictions] == [
        (None, "pos", True), ("pos", "pos", False), (None, "neg", True)]
    assert predictions[0].scores == {"neg": pytest.approx(0.3), "pos": pytest.approx(0.7)}
    route.metrics.abstentions.labels.assert_called_with("1")
    assert route.metrics.abstentions.labels.return_value.inc.call_count == 2
    # The event keeps what the model made of the text, and says it was not answered
    events = [c.args[0] for c in publisher.offer.call_args_list]
    assert [(e.top_label, e.abstained) for e in events] == [("pos", True), ("pos", False), ("neg", True)]


def test_without_a_threshold_nothing_abstains() -> None:
    route, _ = router()
    predictions = route.predict(model(1, Scored([[0.5, 0.5], [0.51, 0.49]])), None, ["a", "b"])
    assert [(p.label, p.abstained) for p in predictions] == [("neg", False), ("neg", False)]


def test_the_declared_out_of_scope_label_is_answered_as_an_abstention() -> None:
    route, _ = router()
    live = replace(model(1, Scored([[0.9, 0.1], [0.2, 0.8]])), out_of_scope="neg")
    predictions = route.predict(live, None, ["none of the intents", "an intent"])
    assert [(p.label, p.top_label, p.abstained) for p in predictions] == [(None, "neg", True), ("pos", "pos", False)]

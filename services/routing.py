"""Which model answers a text: the live version; a canary for a share of texts; a shadow off the request path.

A canary answers the texts routed to it (each text with probability `share`); when it fails a
batch, the live version answers those texts too. A shadow scores the served batch with the
candidate on its own thread, never answers, and is skipped (counted) when it falls behind.
Every score becomes a prediction event.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.follower import Candidate
from services.live_model import LiveModel
from services.metrics import ServiceMetrics
from services.prediction_events import PredictionPublisher
from services.schemas import Prediction
from tuneloop.rollout_stage import CANARY, SHADOW

log = logging.getLogger("tuneloop.service")


class Router:
    def __init__(self, publisher: PredictionPublisher, metrics: ServiceMetrics, shadow_queue: int) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self._rng = np.random.default_rng()
        self._shadow_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._shadow_slots = threading.BoundedSemaphore(shadow_queue)

    def predict(self, live: LiveModel, candidate: Candidate | None, texts: list[str]) -> list[Prediction]:
        """One prediction per text, in order, by the live version or the canary; a shadow scores beside."""
        if candidate is not None and candidate.stage == CANARY:
            routed = np.flatnonzero(self._rng.random(len(texts)) < candidate.share)
            if len(routed):
                return self._predict_canary(live, candidate.model, texts, routed)
        predictions = self.classify(live, texts)
        if candidate is not None and candidate.stage == SHADOW:
            self._shadow(candidate.model, texts, predictions)
        return predictions

    def classify(
        self, live: LiveModel, texts: list[str], request_ids: list[str] | None = None, shadow: bool = False
    ) -> list[Prediction]:
        """Score texts with one model and publish a prediction event per text."""
        started = time.perf_counter()
        scores = live.classifier.predict(texts)
        if not shadow:
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
        labels = live.manifest.labels
        predictions = []
        tokens = scores.tokens if scores.tokens is not None else [None] * len(texts)
        unknown = scores.unknown_tokens if scores.unknown_tokens is not None else [None] * len(texts)
        for i, (text, row) in enumerate(zip(texts, scores.probabilities, strict=True)):
            label = labels[int(row.argmax())]
            abstained = label == live.out_of_scope or (
                live.abstain_below is not None and float(row.max()) < live.abstain_below)
            if shadow:
                self.metrics.shadow_predictions.labels(str(live.version)).inc()
            else:
                self.metrics.predictions.labels(label, str(live.version)).inc()
                if abstained:
                    self.metrics.abstentions.labels(str(live.version)).inc()
            prediction = Prediction(
                request_id=request_ids[i] if request_ids else uuid.uuid4().hex,
                label=None if abstained else label,
                top_label=label,
                abstained=abstained,
                scores={name: round(float(p), 6) for name, p in zip(labels, row, strict=True)},
                model_version=live.version,
            )
            predictions.append(prediction)
            self.publisher.offer(prediction, text, (scores.sketch[i], tokens[i], unknown[i]), shadow)
        return predictions

    def close(self) -> None:
        """Let the shadow batch in progress finish; drop the queued ones (they would answer nobody)."""
        self._shadow_executor.shutdown(wait=True, cancel_futures=True)

    def _predict_canary(
        self, live: LiveModel, canary: LiveModel, texts: list[str], routed: np.ndarray
    ) -> list[Prediction]:
        """The canary answers the routed texts and the live version the rest; a canary failure falls back."""
        rest = np.setdiff1d(np.arange(len(texts)), routed)
        answers: list[Prediction | None] = [None] * len(texts)
        try:
            for i, prediction in zip(routed, self.classify(canary, [texts[i] for i in routed]), strict=True):
                answers[i] = prediction
        except Exception:
            self.metrics.candidate_failures.labels(CANARY).inc()
            log.exception("canary v%s failed a batch; the live version answers it", canary.version)
            rest = np.arange(len(texts))
        if len(rest):
            for i, prediction in zip(rest, self.classify(live, [texts[i] for i in rest]), strict=True):
                answers[i] = prediction
        return answers  # type: ignore[return-value]  # every slot is filled above

    def _shadow(self, candidate: LiveModel, texts: list[str], served: list[Prediction]) -> None:
        """Score the batch with the candidate off the request path; skipped (counted) when it falls behind."""
        if not self._shadow_slots.acquire(blocking=False):
            self.metrics.shadow_skipped.inc(len(texts))
            return

        def score() -> None:
            try:
                self.classify(candidate, texts, [p.request_id for p in served], shadow=True)
            except Exception:
                self.metrics.candidate_failures.labels(SHADOW).inc()
                log.exception("shadow v%s failed a batch", candidate.version)
            finally:
                self._shadow_slots.release()

        try:
            self._shadow_executor.submit(score)
        except RuntimeError:  # shutting down
            self._shadow_slots.release()
            self.metrics.shadow_skipped.inc(len(texts))

"""The service's Prometheus metrics, all named ``tuneloop_*``.

Created on first use inside a worker: BentoML sets PROMETHEUS_MULTIPROC_DIR when a
worker starts, and prometheus_client picks its storage at import, so importing it
at module load would hide every worker's numbers from ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the types only: importing prometheus_client here would pick its storage too early
    from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ServiceMetrics:
    requests: Counter
    request_seconds: Histogram
    batch_texts: Histogram
    inference_seconds: Histogram
    predictions: Counter
    abstentions: Counter
    model_version: Gauge
    model_loaded: Gauge
    model_load_failures: Counter
    model_swaps: Counter
    model_swap_seconds: Histogram
    feedback_accepted: Counter
    feedback_spooled: Gauge
    feedback_replayed: Counter
    prediction_events_published: Counter
    prediction_events_dropped: Counter
    prediction_events_spooled: Gauge
    prediction_events_replayed: Counter
    candidate_version: Gauge
    shadow_predictions: Counter
    shadow_skipped: Counter
    candidate_failures: Counter


@lru_cache(maxsize=1)
def service_metrics() -> ServiceMetrics:
    import prometheus_client as prom

    return ServiceMetrics(
        requests=prom.Counter(
            "tuneloop_http_requests_total", "HTTP requests by endpoint and status code.", ["endpoint", "status"]
        ),
        request_seconds=prom.Histogram(
            "tuneloop_http_request_duration_seconds",
            "HTTP request latency by endpoint, from first byte in to last byte out.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
        ),
        batch_texts=prom.Histogram(
            "tuneloop_inference_batch_texts", "Texts per inference batch (requests that queued while the model was busy run together).", buckets=BATCH_BUCKETS
        ),
        inference_seconds=prom.Histogram(
            "tuneloop_inference_duration_seconds", "Model time per inference batch.", buckets=LATENCY_BUCKETS
        ),
        predictions=prom.Counter(
            "tuneloop_predictions_total", "Texts classified, by predicted label and model version.", ["label", "version"]
        ),
        abstentions=prom.Counter(
            "tuneloop_abstentions_total", "Texts answered `label: null` (top score below serve.abstain_below, or the "
            "out-of-scope label), by model version; also counted in tuneloop_predictions_total under their top label.",
            ["version"],
        ),
        model_version=prom.Gauge(
            "tuneloop_model_version", "Registry version of the model being served.", multiprocess_mode="livemax"
        ),
        model_loaded=prom.Gauge(
            "tuneloop_model_loaded", "1 when a verified model is loaded, else 0.", multiprocess_mode="livemin"
        ),
        model_load_failures=prom.Counter(
            "tuneloop_model_load_failures_total", "Model loads that failed (missing, corrupt or unreadable)."
        ),
        model_swaps=prom.Counter("tuneloop_model_swaps_total", "Hot swaps to a newly promoted or rolled-back version."),
        model_swap_seconds=prom.Histogram(
            "tuneloop_model_swap_duration_seconds", "Load, verify and warm a new version, up to the swap.",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
        ),
        feedback_accepted=prom.Counter(
            "tuneloop_feedback_accepted_total", "Feedback answered 202, by how it was made durable.", ["via"]
        ),
        feedback_spooled=prom.Gauge(
            "tuneloop_feedback_spooled", "Accepted feedback waiting in the local spool for Kafka.", multiprocess_mode="livesum"
        ),
        feedback_replayed=prom.Counter("tuneloop_feedback_replayed_total", "Spooled feedback delivered to Kafka later."),
        prediction_events_published=prom.Counter(
            "tuneloop_prediction_events_published_total", "Prediction events acknowledged by the bus."
        ),
        prediction_events_dropped=prom.Counter(
            "tuneloop_prediction_events_dropped_total",
            "Prediction events dropped: queue full, or bus and spool unavailable (the embedded log has no spool).",
        ),
        prediction_events_spooled=prom.Gauge(
            "tuneloop_prediction_events_spooled", "Prediction events waiting in the local spool for Kafka.",
            multiprocess_mode="livesum",
        ),
        prediction_events_replayed=prom.Counter(
            "tuneloop_prediction_events_replayed_total", "Spooled prediction events delivered to Kafka later."
        ),
        candidate_version=prom.Gauge(
            "tuneloop_candidate_version", "Version in shadow or canary next to the live one (0: none).",
            ["stage"], multiprocess_mode="livemax",
        ),
        shadow_predictions=prom.Counter(
            "tuneloop_shadow_predictions_total", "Texts a candidate in shadow scored without answering.", ["version"]
        ),
        shadow_skipped=prom.Counter(
            "tuneloop_shadow_skipped_total", "Texts not scored in shadow because the shadow queue was full."
        ),
        candidate_failures=prom.Counter(
            "tuneloop_candidate_failures_total",
            "Candidate batches that raised; canary texts were answered by the live version instead.", ["stage"],
        ),
    )

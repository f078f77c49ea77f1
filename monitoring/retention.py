"""Retention: what the loop writes without end is pruned, at most every few minutes, by the controller.

Predictions (served and shadow) older than `controller.retention_days` (feedback joins one within
`controller.join_timeout_s`, long before); embedded-log messages as old that every reader has
committed (Kafka's own `retention.ms` applies to its topics); what exports killed mid-way left in
the registry's staging directory. Stored feedback is never deleted: it is the training data.
"""

from __future__ import annotations

import logging
import time

from tuneloop.bus import Bus
from tuneloop.clock import utc_iso
from tuneloop.config import ControllerConfig
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry

log = logging.getLogger("tuneloop.retention")

INTERVAL_S = 600.0
ABANDONED_EXPORT_S = 3600.0  # an export takes minutes; one this old was killed


class Retention:
    def __init__(self, config: ControllerConfig, store: FeedbackStore, bus: Bus, registry: Registry) -> None:
        self.config = config
        self.store = store
        self.bus = bus
        self.registry = registry
        self._next = 0.0

    def prune(self) -> None:
        """Prune once per INTERVAL_S (the first call prunes)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + INTERVAL_S
        cutoff = time.time() - self.config.retention_days * 86_400
        predictions = self.store.prune_predictions(utc_iso(cutoff))
        messages = self.bus.prune(cutoff)
        exports = self.registry.remove_abandoned(ABANDONED_EXPORT_S)
        if predictions or messages or exports:
            log.info("retention: %d predictions, %d log messages, %d abandoned exports removed",
                     predictions, messages, len(exports))

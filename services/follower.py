"""The model follower: a replica serves what the registry says, and swaps when that changes.

It serves the live version (the registry's `live` pointer), and a candidate in shadow or canary beside it. A
version is loaded, verified and warmed in the background before one reference assignment swaps
it in: a batch already running finishes on the old model. The registry is polled, and model
events on Kafka wake the follower at once; the registry holds the truth, so a lost event only
delays a swap. A version that failed to load is retried after 30 s (2 s while the replica
serves nothing yet).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from services.live_model import LiveModel, load_live_model
from services.metrics import ServiceMetrics
from tuneloop.bus import Bus
from tuneloop.config import Settings
from tuneloop.events import ModelEvent
from tuneloop.registry import Registry, Rollout
from tuneloop.rollout_stage import RolloutStage

log = logging.getLogger("tuneloop.service")

RECONNECT_S = 5.0


@dataclass(frozen=True)
class Candidate:
    model: LiveModel  # the candidate version, loaded
    stage: RolloutStage
    share: float


def refreeze() -> float:
    """Freeze what lives now, the model just loaded included, so that full collections stop rescanning it;
    returns the seconds it took (one full collection, which holds the interpreter like any other).

    What the last freeze kept is thawed and collected first: the model just replaced is among it, and a
    frozen object in a reference cycle would never be freed."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


class ModelFollower:
    def __init__(self, registry: Registry, settings: Settings, metrics: ServiceMetrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.live: LiveModel | None = None
        self.candidate: Candidate | None = None
        self._wake = threading.Event()  # set by a model event: look at the registry now
        self._stopped = threading.Event()
        self._failed: dict[int, float] = {}  # version -> when it last failed to load
        self._threads: list[threading.Thread] = []

    # -- threads -------------------------------------------------------------------------------

    def listen(self, bus: Bus, topic: str) -> None:
        """Wake on every model event on `topic` (Kafka: every replica sees every event)."""
        self._spawn(self._follow_model_events, "model-events", bus, topic)

    def watch(self) -> None:
        """Follow the registry in the background: polled, and at once when a model event wakes the follower."""
        self._spawn(self._watch_registry, "registry-watch")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching and listening; a load in progress may finish (its threads are daemons)."""
        self._stopped.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _watch_registry(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(timeout=self.settings.serve.watch_interval_s)
            self._wake.clear()
            if not self._stopped.is_set():
                self.follow_once()

    def _follow_model_events(self, bus: Bus, topic: str) -> None:
        """Reconnect whenever the broker goes away; the registry poll finds every change meanwhile."""
        while not self._stopped.is_set():
            try:
                self._tail(bus, topic)
            except Exception as exc:
                log.warning("model events unavailable (%s); polling the registry meanwhile, retrying in 5 s", exc)
                self._stopped.wait(RECONNECT_S)

    def _tail(self, bus: Bus, topic: str) -> None:
        with contextlib.closing(bus.tail(topic)) as consumer:
            while not self._stopped.is_set():
                for record in consumer.poll(max_records=50, timeout_s=1.0):
                    self._on_model_event(topic, record.value)

    def _on_model_event(self, topic: str, value: bytes) -> None:
        try:
            event = ModelEvent.model_validate_json(value)
        except ValidationError:
            log.warning("ignored a malformed message on %s", topic)
        else:
            log.info("model event: %s v%s (%s)", event.action, event.version, event.reason)
        self._wake.set()

    # -- following -----------------------------------------------------------------------------

    def follow_once(self) -> None:
        """`follow`, logging (not raising) why it could not."""
        try:
            self.follow()
        except Exception as exc:  # an unreadable pointer or rollout file: keep serving (or stay unready), say why
            log.warning("cannot follow the registry: %s", exc)

    def follow(self) -> None:
        """Make this replica serve what the registry says: the live version, and the candidate if any."""
        wanted = self.registry.live_version()
        rollout = self.registry.rollout()
        if wanted is not None and (self.live is None or self.live.version != wanted):
            self._swap_live(wanted)
        self._follow_candidate(rollout)

    def _load(self, version: int) -> LiveModel | None:
        """Load a version; None (and the reason in the log) when it fails."""
        backoff = 2.0 if self.live is None else 30.0  # a replica serving nothing keeps trying harder
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < backoff:
            return None
        try:
            live = load_live_model(self.registry, self.settings, version)
        except Exception as exc:  # the replica keeps what it serves (or stays not ready)
            self._failed[version] = time.monotonic()
            self.metrics.model_load_failures.inc()
            served = f"v{self.live.version}" if self.live else "nothing"
            log.warning("model v%s not loaded (%s); serving %s", version, exc, served)
            return None
        self._failed.pop(version, None)
        return live

    def _swap_live(self, version: int) -> None:
        previous = self.live
        started = time.perf_counter()
        candidate = self.candidate
        # A promoted candidate is loaded and warm already: swap to it without loading again.
        live = candidate.model if candidate is not None and candidate.model.version == version else self._load(version)
        if live is None:
            return
        # One reference assignment: a batch already running holds the old model and finishes on it;
        # every later batch gets the new one. Responses name the version that served them.
        self.live = live
        self.metrics.model_version.set(live.version)
        self.metrics.model_loaded.set(1)
        took = time.perf_counter() - started
        replaced = None if previous is None else previous.version
        # Let go of the replaced model first, or it would be frozen again (a batch still running on it keeps it
        # until the next swap thaws it).
        del previous, candidate
        collected_ms = refreeze() * 1000
        if replaced is None:
            log.info("serving model v%s (%s backend)", live.version, live.backend)
            return
        self.metrics.model_swaps.inc()
        self.metrics.model_swap_seconds.observe(took)
        log.warning("swapped model v%s -> v%s in %.2f s (then a full collection of %.0f ms)",
                    replaced, live.version, took, collected_ms)

    def _follow_candidate(self, rollout: Rollout | None) -> None:
        held = self.candidate
        if rollout is None or (self.live is not None and rollout.version == self.live.version):
            if held is not None:
                self.candidate = None
                self.metrics.candidate_version.labels(held.stage).set(0)
                log.warning("candidate v%s withdrawn from %s", held.model.version, held.stage)
            return
        if held is not None and held.model.version == rollout.version:
            if (held.stage, held.share) != (rollout.stage, rollout.share):
                self.candidate = replace(held, stage=rollout.stage, share=rollout.share)
                self.metrics.candidate_version.labels(held.stage).set(0)
                self.metrics.candidate_version.labels(rollout.stage).set(rollout.version)
                log.warning("candidate v%s: %s -> %s", rollout.version, held.stage, rollout.stage)
            return
        model = self._load(rollout.version)
        if model is None:
            return
        self.candidate = Candidate(model, rollout.stage, rollout.share)
        if held is not None:
            self.metrics.candidate_version.labels(held.stage).set(0)
        self.metrics.candidate_version.labels(rollout.stage).set(rollout.version)
        log.warning("candidate v%s in %s (share %.2f)", rollout.version, rollout.stage, rollout.share)

"""The model follower in process, on a registry of stand-in versions: swaps, candidates, failures, wake-ups."""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import ClassVar
from unittest.mock import MagicMock

import numpy as np
import pytest

from services import live_model
from services.follower import ModelFollower
from tests.support.processes import wait_for
from tuneloop.bus import Record
from tuneloop.config import Settings
from tuneloop.events import ModelEvent
from tuneloop.inference import Scores
from tuneloop.registry import Manifest, Registry


def publish(registry: Registry, payload: bytes = b"v1", promote: bool = True, parent: int | None = None) -> int:
    with registry.staging() as stage:
        (stage / "model.onnx").write_bytes(payload)
        return registry.publish(
            stage, base_model="base", labels=["neg", "pos"], parent_version=parent, promote=promote
        ).version


class StandIn:
    """Answers every text with the first label; counts how often each version was built."""

    built: ClassVar[dict[int, int]] = {}
    broken: ClassVar[set[int]] = set()

    def __init__(self, manifest: Manifest) -> None:
        self.labels = manifest.labels
        self.itself = self  # a reference cycle, as real models hold: only the cyclic collector can free one

    @classmethod
    def load(cls, manifest: Manifest, directory: Path, settings: Settings) -> StandIn:
        if manifest.version in cls.broken:
            raise OSError(f"v{manifest.version} is broken")
        cls.built[manifest.version] = cls.built.get(manifest.version, 0) + 1
        return cls(manifest)

    def predict(self, texts: list[str]) -> Scores:
        probabilities = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        probabilities[:, 0] = 1.0
        return Scores(logits=probabilities, probabilities=probabilities, sketch=np.zeros((len(texts), 2), dtype=np.float32))


@pytest.fixture(autouse=True)
def stand_in_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(live_model.BACKENDS, "onnx", StandIn.load)
    StandIn.built, StandIn.broken = {}, set()


def follower_on(registry: Registry, watch_interval_s: float = 300.0) -> ModelFollower:
    settings = Settings()
    settings.serve.backend = "onnx"
    settings.serve.watch_interval_s = watch_interval_s
    return ModelFollower(registry, settings, MagicMock())



def test_an_empty_registry_leaves_the_replica_serving_nothing(tmp_path: Path) -> None:
    follower = follower_on(Registry(tmp_path))
    follower.follow()
    assert follower.live is None and follower.candidate is None


def test_the_current_version_is_loaded_and_a_promotion_swaps_to_the_next(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    follower = follower_on(registry)
    follower.follow()
    assert follower.live is not None and follower.live.version == 1 and follower.live.backend == "onnx"
    follower.metrics.model_loaded.set.assert_called_with(1)
    follower.metrics.model_swaps.inc.assert_not_called()  # the first load is no swap
    publish(registry, b"v2", parent=1)
    follower.follow()
    assert follower.live.version == 2
    follower.metrics.model_swaps.inc.assert_called_once()
    follower.follow()  # nothing changed: nothing is loaded again
    assert StandIn.built == {1: 1, 2: 1}


def test_every_model_swapped_in_is_frozen_and_the_one_it_replaced_is_freed(tmp_path: Path) -> None:
    # Only the first model was gc.freeze()d (by the service, at start): models swapped in were rescanned by every
    # full collection. Freezing them without thawing first would keep each replaced model, cycles and all, forever.
    registry = Registry(tmp_path)
    publish(registry)
    follower = follower_on(registry)
    try:
        for version in (1, 2, 3):
            if version > 1:
                publish(registry, f"v{version}".encode(), parent=version - 1)
                replaced = weakref.ref(follower.live.classifier)
            follower.follow()
            live = follower.live.classifier
            assert follower.live.version == version
            assert not any(o is live for o in gc.get_objects()), f"v{version} is not frozen"
            del live  # the test holds no model across a swap, as the service holds none
            if version > 1:
                gc.collect()
                assert replaced() is None, f"v{version - 1} was never freed"
    finally:
        gc.unfreeze()


def test_a_candidate_is_followed_through_its_stages_and_its_promotion_costs_no_reload(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", parent=1, promote=False)
    follower = follower_on(registry)
    follower.follow()
    registry.start_rollout(2, "shadow", 0.0, "test")
    follower.follow()
    assert follower.candidate is not None
    assert (follower.candidate.model.version, follower.candidate.stage) == (2, "shadow")
    registry.start_rollout(2, "canary", 0.25, "test")
    follower.follow()
    assert (follower.candidate.stage, follower.candidate.share) == ("canary", 0.25)
    registry.end_rollout(True, "test")
    follower.follow()
    assert follower.live.version == 2 and follower.candidate is None
    assert StandIn.built == {1: 1, 2: 1}


def test_a_withdrawn_candidate_is_unloaded(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    publish(registry, b"v2", parent=1, promote=False)
    follower = follower_on(registry)
    registry.start_rollout(2, "shadow", 0.0, "test")
    follower.follow()
    assert follower.candidate is not None
    registry.end_rollout(False, "test")
    follower.follow()
    assert follower.candidate is None and follower.live.version == 1


def test_a_version_that_fails_to_load_is_not_served_and_retried_only_after_the_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    follower = follower_on(registry)
    follower.follow()
    publish(registry, b"v2", parent=1)
    StandIn.broken = {2}
    follower.follow()
    assert follower.live.version == 1
    assert "model v2 not loaded (v2 is broken); serving v1" in caplog.text
    StandIn.broken = set()
    follower.follow()  # within the 30 s back-off: not tried again
    assert follower.live.version == 1
    follower._failed[2] -= 30  # as if 30 s had passed
    follower.follow()
    assert follower.live.version == 2
    assert follower.metrics.model_load_failures.inc.call_count == 1


def test_an_unreadable_pointer_is_logged_and_the_replica_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path)
    publish(registry)
    follower = follower_on(registry)
    follower.follow_once()
    registry.storage.live_file.write_text("garbage")
    follower.follow_once()
    assert follower.live.version == 1
    assert "cannot follow the registry" in caplog.text


class OneEventBus:
    """A bus whose model topic carries the given messages, then nothing; the first tail fails."""

    def __init__(self, *values: bytes) -> None:
        self.values = list(values)
        self.tails = 0
        self.closed = threading.Event()

    def tail(self, topic: str) -> OneEventBus:
        self.tails += 1
        if self.tails == 1:
            raise ConnectionError("broker not up yet")
        return self

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        values, self.values = self.values, []
        if not values:
            time.sleep(0.01)
        return [Record("tuneloop.model-events", 0, i, None, value) for i, value in enumerate(values)]

    def close(self) -> None:
        self.closed.set()


def test_a_model_event_wakes_the_watch_at_once_and_stop_ends_both_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("services.follower.RECONNECT_S", 0.05)
    registry = Registry(tmp_path)
    publish(registry)
    follower = follower_on(registry, watch_interval_s=300.0)  # only a wake-up can make it look again
    follower.follow_once()
    publish(registry, b"v2", parent=1)
    event = ModelEvent(action="promote", version=2, previous=1, reason="test")
    bus = OneEventBus(b"not json", event.model_dump_json().encode())
    follower.watch()
    follower.listen(bus, "tuneloop.model-events")  # type: ignore[arg-type]
    wait_for(lambda: follower.live.version == 2, 10, "the follower on v2", interval=0.02)
    assert bus.tails == 2  # reconnected after the first failure
    assert "model events unavailable (broker not up yet)" in caplog.text
    assert "ignored a malformed message on tuneloop.model-events" in caplog.text
    assert "model event: promote v2 (test)" in caplog.text
    follower.stop(timeout_s=5)
    assert bus.closed.is_set()
    assert not any(t.is_alive() for t in follower._threads)

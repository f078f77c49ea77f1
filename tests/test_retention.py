"""Nothing grows without bound (monitoring/retention.py): predictions, the embedded log and crashed exports are pruned.

Six minutes of traffic left 44 MB of predictions and 16 MB of embedded-log messages that nothing ever deleted, and
every export a killed run left behind (about 200 MB) stayed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from monitoring.retention import Retention
from tuneloop.bus import EmbeddedBus
from tuneloop.clock import utc_iso
from tuneloop.config import ControllerConfig
from tuneloop.events import FeedbackEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry

DAY = 86_400.0


def prediction(request_id: str, age_s: float, shadow: bool = False) -> PredictionEvent:
    return PredictionEvent(request_id=request_id, text="t", label="a", scores={"a": 1.0}, model_version=1,
                           timestamp=utc_iso(time.time() - age_s), shadow=shadow)


def test_predictions_past_retention_go_and_feedback_stays(store_url: str) -> None:
    store = FeedbackStore(store_url)
    store.write([prediction("old", 40 * DAY), prediction("old", 40 * DAY, shadow=True), prediction("new", 60)],
                [FeedbackEvent(request_id="old", label="a")])
    assert store.count("predictions") == 2 and store.count() == 1
    assert store.prune_predictions(utc_iso(time.time() - 30 * DAY)) == 2  # the old one and its shadow
    assert store.count("predictions") == 1 and store.count() == 1


def test_the_embedded_log_drops_old_messages_every_reader_committed(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "events.db")
    bus.publish_many("read", [(None, b"1"), (None, b"2")])
    bus.publish_many("unread", [(None, b"3")])
    bus.publish_many("nobody-commits", [(None, b"4")])
    reader = bus.consumer("g", ["read", "unread"])
    reader.commit([r for r in reader.poll(10, 0.1) if r.topic == "read"])
    assert bus.prune(older_than_unix=time.time() + 1) == 2  # "read"; what no group committed yet may still be read
    assert [r.value for r in bus.consumer("g2", ["read", "unread", "nobody-commits"]).poll(10, 0.1)] == [b"3", b"4"]
    assert bus.prune(older_than_unix=time.time() - DAY) == 0  # younger than the retention: kept


def test_the_controller_prunes_at_an_interval_and_crashed_exports_are_removed(tmp_path: Path, store_url: str) -> None:
    store, bus, registry = FeedbackStore(store_url), EmbeddedBus(tmp_path / "events.db"), Registry(tmp_path / "r")
    store.write([prediction("old", 40 * DAY)], [])
    crashed = registry.staging_dir / "staged-crashed"
    crashed.mkdir(parents=True)
    (crashed / "model.onnx").write_bytes(b"half")
    os.utime(crashed, (time.time() - DAY, time.time() - DAY))
    fresh = registry.staging_dir / "staged-running"
    fresh.mkdir()
    retention = Retention(ControllerConfig(retention_days=30), store, bus, registry)
    retention.prune()
    assert store.count("predictions") == 0 and not crashed.exists() and fresh.exists()
    store.write([prediction("old2", 40 * DAY)], [])
    retention.prune()  # within the interval: not yet
    assert store.count("predictions") == 1

"""The rollout judge at work, in process: a stage's feedback compared, judged, moved on in the registry, announced."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitoring.metrics import ControllerMetrics
from monitoring.rollout_watch import RolloutWatch
from tuneloop.config import RolloutConfig
from tuneloop.events import FeedbackEvent, ModelEvent, PredictionEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry, RegistryError, Rollout

CONFIG = RolloutConfig(stages=["shadow", "canary"], bake_s=0, min_feedback_rows=20, canary_share=0.3)


def publish(registry: Registry, payload: bytes, promote: bool) -> int:
    with registry.staging() as stage:
        (stage / "model.onnx").write_bytes(payload)
        return registry.publish(stage, base_model="base", labels=["neg", "pos"], promote=promote).version


class Setup:
    def __init__(self, tmp_path: Path, store_url: str, registry: Registry | None = None) -> None:
        self.registry = registry or Registry(tmp_path / "registry")
        publish(self.registry, b"v1", promote=True)
        publish(self.registry, b"v2", promote=False)
        self.store = FeedbackStore(store_url)
        self.prometheus = CollectorRegistry()
        self.announced: list[ModelEvent] = []
        self.watch = RolloutWatch(CONFIG, self.registry, self.store, ControllerMetrics(self.prometheus).rollout,
                                  self.announced.append)

    def shadow_traffic(self, rows: int, candidate_right: bool) -> None:
        """Feedback on `rows` served requests, all answered right by v1; v2 scored them in shadow."""
        predictions, feedback = [], []
        for i in range(rows):
            served = PredictionEvent(request_id=f"r{i}", text="t", label="pos", scores={"pos": 1.0}, model_version=1)
            shadow = served.model_copy(update={"label": "pos" if candidate_right else "neg", "model_version": 2,
                                               "shadow": True})
            predictions += [served, shadow]
            feedback.append(FeedbackEvent(request_id=f"r{i}", label="pos"))
        self.store.write(predictions, feedback)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.prometheus.get_sample_value(name, labels)


def test_a_good_shadow_advances_to_canary_and_the_change_is_announced(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    s.registry.start_rollout(2, "shadow", 0.0, "test")
    s.shadow_traffic(30, candidate_right=True)
    s.watch.judge()
    rollout = s.registry.rollout()
    assert rollout is not None and (rollout.stage, rollout.share) == ("canary", 0.3)
    assert [(e.action, e.version, e.previous) for e in s.announced] == [("canary", 2, 1)]
    assert s.announced[0].reason.startswith("good: shadow baked")
    assert s.sample("tuneloop_rollout_stage_version", stage="shadow") == 2  # the stage it judged
    assert s.sample("tuneloop_rollout_feedback_rows", role="candidate") == 30
    assert s.sample("tuneloop_rollout_feedback_accuracy", role="live") == 1.0
    assert s.sample("tuneloop_rollout_verdicts_total", action="advance", reason="good") == 1
    s.watch.judge()  # within JUDGE_INTERVAL_S: not judged again
    assert s.sample("tuneloop_rollout_stage_version", stage="canary") == 0
    assert len(s.announced) == 1


def test_a_worse_shadow_is_withdrawn(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    s.registry.start_rollout(2, "shadow", 0.0, "test")
    s.shadow_traffic(30, candidate_right=False)
    s.watch.judge()
    assert s.registry.rollout() is None and s.registry.live_version() == 1
    assert [(e.action, e.version) for e in s.announced] == [("withdraw", 2)]
    assert s.sample("tuneloop_rollout_verdicts_total", action="withdraw", reason="worse") == 1
    assert s.sample("tuneloop_rollout_p_worse") < CONFIG.alpha


def test_too_little_feedback_waits_and_no_rollout_exports_zero_stages(tmp_path: Path, store_url: str) -> None:
    s = Setup(tmp_path, store_url)
    s.watch.judge()
    assert s.sample("tuneloop_rollout_stage_version", stage="shadow") == 0
    s.registry.start_rollout(2, "shadow", 0.0, "test")
    s.shadow_traffic(5, candidate_right=True)
    s.watch._next_judgement = 0.0  # as if JUDGE_INTERVAL_S had passed
    s.watch.judge()
    assert s.registry.rollout().stage == "shadow" and s.announced == []


class EndedMeanwhile(Registry):
    def end_rollout(self, promote: bool, reason: str) -> Rollout:
        raise RegistryError("no rollout is in progress")


def test_a_rollout_ended_by_someone_else_meanwhile_is_logged_not_announced(
    tmp_path: Path, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, store_url, EndedMeanwhile(tmp_path / "registry"))
    s.registry.start_rollout(2, "canary", 0.3, "test")
    s.store.write(
        [PredictionEvent(request_id=f"r{i}", text="t", label="neg", scores={"neg": 1.0}, model_version=2) for i in range(30)]
        + [PredictionEvent(request_id=f"s{i}", text="t", label="pos", scores={"pos": 1.0}, model_version=1)
           for i in range(30)],
        [FeedbackEvent(request_id=f"{p}{i}", label="pos") for p in "rs" for i in range(30)],
    )
    s.watch.judge()
    assert s.announced == []
    assert "rollout of v2 not" in caplog.text and "no rollout is in progress" in caplog.text


def test_a_rollout_with_no_live_version_is_refused_and_one_left_on_disk_is_promoted(tmp_path: Path, store_url: str) -> None:
    # With nothing live, the judge skipped the rollout for ever: it never timed out, and it held off every training run.
    registry = Registry(tmp_path / "registry")
    publish(registry, b"v1", promote=False)
    with pytest.raises(RegistryError, match="no version is live"):
        registry.start_rollout(1, "shadow", 0.0, "test")
    registry.storage.rollout_file.write_text(Rollout(version=1, live=None, stage="shadow", started_at="2026-11-29T00:00:00+00:00",
                                             stage_started_at="2026-11-29T00:00:00+00:00").model_dump_json())
    prometheus, announced = CollectorRegistry(), []
    watch = RolloutWatch(CONFIG, registry, FeedbackStore(store_url), ControllerMetrics(prometheus).rollout,
                         announced.append)
    watch.judge()
    assert registry.rollout() is None and registry.live_version() == 1
    assert [(e.action, e.version) for e in announced] == [("promote", 1)]
    verdicts = {"action": "promote", "reason": "no_live_version"}
    assert prometheus.get_sample_value("tuneloop_rollout_verdicts_total", verdicts) == 1

"""`build_v1()` and `build_candidate()`: what `tuneloop bootstrap` and `tuneloop train` do, as functions.

Each trains (`trainer.runs`), exports and publishes (`exporters.build`); a candidate is judged by the gate against
the live version, then promoted or put in the first rollout stage, and the replicas are told on the model topic.
The results carry every figure the command prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exporters.build import Release, build_and_publish
from exporters.gate import GateRows, run_gate
from exporters.quantize import Parity
from trainer.runs import BootstrapRun, FeedbackRun, Say, bootstrap, quiet, train_on_feedback
from tuneloop.bus import announce_model_event
from tuneloop.config import Settings
from tuneloop.events import ModelEvent
from tuneloop.inference import OnnxTextClassifier
from tuneloop.registry import Manifest, Registry, RegistryError


@dataclass(frozen=True)
class V1Built:
    run: BootstrapRun
    manifest: Manifest


@dataclass(frozen=True)
class CandidateBuilt:
    run: FeedbackRun
    manifest: Manifest
    outcome: str  # "promoted", "in shadow", "in canary", "REJECTED", or "not promoted: ..." when its parent left
    warnings: list[str] = field(default_factory=list)  # model events the bus did not take (the registry holds the truth)

    @property
    def accepted(self) -> bool:
        return self.manifest.status == "accepted"


def build_v1(settings: Settings, registry: Registry, data: Path, labels: list[str] | None = None,
             progress: bool = True, say: Say = quiet) -> V1Built:
    """Train v1 on the CSV, export it as int8 ONNX, check parity, publish and promote it."""
    run = bootstrap(settings, data, labels, progress, say)
    return V1Built(run, build_and_publish(registry, run.candidate, settings, Release(), progress))


def build_candidate(settings: Settings, registry: Registry, run_id: int | None = None,
                    replay_ratio: float | None = None, progress: bool = True, say: Say = quiet,
                    started: float | None = None, fence: Callable[[], None] | None = None) -> CandidateBuilt:
    """Fine-tune the live version on new feedback plus replay; export and gate; promote (or start the rollout)
    if it passes. The time budget counts from `started` (`time.perf_counter()` at the run's start); `fence` is
    called before publishing and raises to publish nothing. Raises NothingToTrain when there is nothing to do."""
    run = train_on_feedback(settings, registry, run_id, replay_ratio, progress, say, started)
    live = run.live
    live_classifier = OnnxTextClassifier.from_version(live, run.live_dir, "cpu")

    def gate(candidate: OnnxTextClassifier, parity: Parity) -> dict[str, object]:
        rows = GateRows(run.data.new_holdout, run.data.holdout, run.data.known_labels)
        return run_gate(candidate, live_classifier, rows, parity, settings.export.min_argmax_agreement, settings.gate)

    release = Release(gate=gate, reason=f"training run {run_id}" if run_id is not None else "tuneloop train",
                      promote=not settings.rollout.stages, fence=fence)
    manifest = build_and_publish(registry, run.candidate, settings, release, progress)
    warnings: list[str] = []
    outcome = "REJECTED"
    if manifest.status == "accepted" and settings.rollout.stages:
        stage = settings.rollout.stages[0]
        try:
            registry.start_rollout(manifest.version, stage, settings.rollout.canary_share, "passed the gate", live.version)
        except RegistryError as exc:
            return CandidateBuilt(run, manifest, f"not promoted: {exc}", warnings)
        warnings += _announce(settings, stage, manifest.version, live.version)
        outcome = f"in {stage}"
    elif manifest.status == "accepted":
        now_live = registry.live_version()
        if now_live != manifest.version:  # publish promotes a candidate only over its parent
            return CandidateBuilt(run, manifest, f"not promoted: v{now_live} is live, not its parent v{live.version} "
                                  "(a rollback or promotion happened during the run)", warnings)
        warnings += _announce(settings, "promote", manifest.version, live.version)
        outcome = "promoted"
    return CandidateBuilt(run, manifest, outcome, warnings)


def _announce(settings: Settings, action: str, version: int, previous: int) -> list[str]:
    problem = announce_model_event(settings.events, ModelEvent(action=action, version=version, previous=previous))
    return [problem] if problem else []

"""The rollout judge at work: a candidate in shadow or canary, judged on live feedback, moved on in the registry.

Every few seconds the stage's labelled feedback is compared (`monitoring.rollout`: paired in
shadow, unpaired in canary), exported as metrics, and judged; a verdict other than "wait"
advances, promotes or rolls the candidate back in the registry and is announced on the model
topic, so the replicas follow at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from monitoring.metrics import RolloutMetrics
from monitoring.rollout import Comparison, Verdict, compare_paired, compare_unpaired, judge
from tuneloop.clock import unix_seconds
from tuneloop.config import RolloutConfig
from tuneloop.events import ModelEvent
from tuneloop.feedback_store import FeedbackStore
from tuneloop.registry import Registry, RegistryError, Rollout
from tuneloop.rollout_stage import SHADOW, STAGES

log = logging.getLogger("tuneloop.controller")

class RolloutWatch:
    JUDGE_INTERVAL_S = 5.0  # a verdict needs new feedback, which arrives far slower than this

    def __init__(
        self,
        config: RolloutConfig,
        registry: Registry,
        store: FeedbackStore,
        metrics: RolloutMetrics,
        announce: Callable[[ModelEvent], None],
    ) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.announce = announce
        self._next_judgement = 0.0

    def judge(self) -> None:
        """Judge the rollout in progress, at most once per JUDGE_INTERVAL_S."""
        now = time.monotonic()
        if now < self._next_judgement:
            return
        self._next_judgement = now + self.JUDGE_INTERVAL_S
        try:
            rollout = self.registry.rollout()
        except (OSError, ValueError) as exc:
            log.warning("cannot read the rollout: %s", exc)
            return
        for stage in STAGES:
            self.metrics.stage.labels(stage).set(rollout.version if rollout and rollout.stage == stage else 0)
        if rollout is None:
            return
        if rollout.live is None:  # left by hand or by an older release: nothing serves, so nothing to compare with
            self._conclude(rollout, Verdict("promote", "no_live_version", "no version was live to compare it with"))
            return
        comparison = self._compare(rollout)
        for role, rows, accuracy in (
            ("candidate", comparison.candidate_rows, comparison.candidate_accuracy),
            ("live", comparison.live_rows, comparison.live_accuracy),
        ):
            self.metrics.rows.labels(role).set(rows)
            self.metrics.accuracy.labels(role).set(accuracy)
        self.metrics.p_worse.set(comparison.p_worse)
        elapsed = time.time() - unix_seconds(rollout.stage_started_at)
        verdict = judge(self.config, rollout.stage, elapsed, comparison)
        if verdict.action != "wait":
            self._conclude(rollout, verdict)

    def _compare(self, rollout: Rollout) -> Comparison:
        since = rollout.stage_started_at
        if rollout.stage == SHADOW:
            return compare_paired(self.store.shadow_pairs(rollout.version, since))
        assert rollout.live is not None
        return compare_unpaired(
            self.store.labelled_since(rollout.version, since), self.store.labelled_since(rollout.live, since)
        )

    def _conclude(self, rollout: Rollout, verdict: Verdict) -> None:
        config = self.config
        reason = f"{verdict.reason}: {verdict.detail}"
        try:
            if verdict.action == "advance":
                stage = config.stages[config.stages.index(rollout.stage) + 1]
                self.registry.start_rollout(rollout.version, stage, config.canary_share, reason)
                action = stage
            else:
                self.registry.end_rollout(verdict.action == "promote", reason)
                action = verdict.action
        except RegistryError as exc:  # someone else ended or changed it meanwhile
            log.warning("rollout of v%s not moved on (%s): %s", rollout.version, verdict.action, exc)
            return
        self.metrics.verdicts.labels(verdict.action, verdict.reason).inc()
        log.warning("rollout v%s %s -> %s: %s", rollout.version, rollout.stage, action, reason)
        self.announce(ModelEvent(action=action, version=rollout.version, previous=rollout.live, reason=reason))

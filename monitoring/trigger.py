"""When to fine-tune: the trigger policy, as plain rules over plain numbers (no torch here).

A run starts when drift (or an accuracy drop) holds for K consecutive windows of one model
version AND at least M labelled rows arrived since the last run, outside the cooldown and
under the daily cap, once labelled feedback has paused (labels often come in bursts: a run
started mid-burst would train on part of them and leave the rest to the next run, an hour later); or when the schedule is due (with the same M, cap and no run going); or
by hand. Every decision, fired or suppressed, comes back with a reason for the log and a
short reason code for the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tuneloop.config import TriggerConfig

Outcome = Literal["fired", "suppressed", "none"]
DAY_S = 86_400.0


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str  # short code: a metric label
    detail: str  # the sentence for the log
    source: Literal["drift", "schedule", "manual"] = "drift"

    @property
    def fired(self) -> bool:
        return self.outcome == "fired"


@dataclass(frozen=True)
class TriggerState:
    """What the policy needs to know about the world at the moment of a decision."""

    now: float  # unix seconds
    new_rows: int  # labelled rows stored since the last run started
    last_run_started: float | None
    runs_last_day: int
    run_in_progress: bool
    rollout_in_progress: bool = False  # a candidate in shadow or canary: the next run would start from a moving base
    last_row_stored: float | None = None  # unix seconds of the newest labelled row


class TriggerPolicy:
    def __init__(self, config: TriggerConfig, started_at: float) -> None:
        self.config = config
        self._consecutive: dict[int, int] = {}
        self._next_schedule_check = started_at + config.schedule_interval_s
        self._armed: tuple[int, float] | None = None  # (version, since): drift called for a run, feedback still arriving

    @property
    def armed(self) -> bool:
        """Drift called for a run that waits for labelled feedback to pause; `on_tick` starts it."""
        return self._armed is not None

    def consecutive(self, version: int) -> int:
        return self._consecutive.get(version, 0)

    def consecutive_by_version(self) -> dict[int, int]:
        return dict(self._consecutive)

    def on_window(self, version: int, drifted_signals: list[str], state: TriggerState) -> Decision:
        """Decide after a window of `version` closed with these (trigger-relevant) signals drifted."""
        if not drifted_signals:
            self._consecutive[version] = 0
            if self._armed is not None and self._armed[0] == version:
                self._armed = None  # drift no longer holds: the waiting run is off
            return Decision("none", "no_drift", f"v{version}: no drift in this window")
        held = self._consecutive[version] = self.consecutive(version) + 1
        what = f"v{version}: drift in {', '.join(drifted_signals)} ({held}/{self.config.consecutive_windows} windows)"
        if held < self.config.consecutive_windows:
            return Decision("none", "drift_not_sustained", what)
        blocked = self._blocked(state, cooldown=True)
        if blocked:
            return Decision("suppressed", blocked[0], f"{what}; not starting a run: {blocked[1]}")
        if self._armed is None:
            self._armed = (version, state.now)
        return self._fire_when_quiet(state, what)

    def _fire_when_quiet(self, state: TriggerState, what: str) -> Decision:
        assert self._armed is not None
        version, since = self._armed
        quiet = self.config.feedback_quiet_s
        arriving = state.last_row_stored is not None and state.now - state.last_row_stored < quiet
        if arriving and state.now - since < self.config.max_feedback_wait_s:
            return Decision("suppressed", "feedback_arriving",
                            f"{what}; waiting until no labelled row has arrived for {quiet:g} s")
        self._armed = None
        self._consecutive[version] = 0
        return Decision("fired", "drift_sustained", f"{what}; {state.new_rows} new labelled rows")

    def on_tick(self, state: TriggerState) -> Decision | None:
        """A drift-started run waiting for feedback to pause, then the periodic schedule; None when nothing is due."""
        if self._armed is not None:
            version = self._armed[0]
            blocked = self._blocked(state, cooldown=True)
            if blocked:
                self._armed = None
                return Decision("suppressed", blocked[0], f"v{version}: drift held; not starting a run: {blocked[1]}")
            decision = self._fire_when_quiet(state, f"v{version}: drift held")
            if decision.fired:
                return decision
        interval = self.config.schedule_interval_s
        if not interval:
            return None
        due = max(self._next_schedule_check, (state.last_run_started or 0.0) + interval)
        if state.now < due:
            return None
        blocked = self._blocked(state, cooldown=False)
        if blocked:
            # Look again later rather than every step: one suppressed decision per retry period.
            self._next_schedule_check = state.now + min(interval, 600.0)
            return Decision("suppressed", blocked[0], f"schedule due; not starting a run: {blocked[1]}", "schedule")
        self._next_schedule_check = state.now + interval
        return Decision("fired", "schedule", f"schedule due every {interval:g} s; {state.new_rows} new labelled rows", "schedule")

    def run_expected(self, decision: Decision, state: TriggerState) -> bool:
        """Whether a drift run may start within a few windows: drift short of K windows, or a run waiting for
        feedback to pause, and nothing in its way but a row minimum half met (labelled rows arrive with drift)."""
        if decision.reason != "drift_not_sustained" and not self.armed:
            return False
        blocked = self._blocked(state, cooldown=True)
        return blocked is None or (blocked[0] == "too_few_new_rows" and 2 * state.new_rows >= self.config.min_new_rows)

    def on_manual(self, state: TriggerState, reason: str) -> Decision:
        """A person asked: only a run already going stops it (no cooldown, cap or row minimum)."""
        if state.run_in_progress:
            return Decision("suppressed", "run_in_progress", f"manual request ({reason}): a run is in progress", "manual")
        if state.rollout_in_progress:
            return Decision("suppressed", "rollout_in_progress",
                            f"manual request ({reason}): a candidate is in shadow or canary; finish or withdraw it first",
                            "manual")
        return Decision("fired", "manual", f"manual request: {reason}", "manual")

    def _blocked(self, state: TriggerState, cooldown: bool) -> tuple[str, str] | None:
        config = self.config
        if state.run_in_progress:
            return "run_in_progress", "a run is in progress"
        if state.rollout_in_progress:
            return "rollout_in_progress", "a candidate is in shadow or canary"
        if cooldown and state.last_run_started is not None and state.now - state.last_run_started < config.cooldown_s:
            left = config.cooldown_s - (state.now - state.last_run_started)
            return "cooldown", f"cooldown of {config.cooldown_s:g} s has {left:.0f} s left"
        if state.runs_last_day >= config.max_runs_per_day:
            return "daily_limit", f"{state.runs_last_day} runs in the last 24 h (max {config.max_runs_per_day})"
        if state.new_rows < config.min_new_rows:
            return "too_few_new_rows", f"{state.new_rows} new labelled rows, {config.min_new_rows} needed"
        return None

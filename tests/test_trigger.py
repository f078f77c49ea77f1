"""The trigger policy on a clock the test sets: K windows, M rows, cooldown, daily cap, schedule, manual."""

from __future__ import annotations

from dataclasses import replace

import pytest

from monitoring.trigger import TriggerPolicy, TriggerState
from tuneloop.config import TriggerConfig

CONFIG = TriggerConfig(consecutive_windows=3, min_new_rows=100, cooldown_s=3600, max_runs_per_day=2)
IDLE = TriggerState(now=10_000.0, new_rows=500, last_run_started=None, runs_last_day=0, run_in_progress=False)


def windows(policy: TriggerPolicy, drifted: list[bool], state: TriggerState = IDLE, version: int = 1) -> list[str]:
    return [policy.on_window(version, ["embedding_mmd"] if d else [], state).outcome for d in drifted]


def test_fires_only_after_k_consecutive_drifting_windows() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    assert windows(policy, [True, True, False, True, True]) == ["none"] * 5  # the clean window resets the count
    decision = policy.on_window(1, ["confidence_ks"], IDLE)
    assert decision.fired and decision.reason == "drift_sustained"
    assert "confidence_ks" in decision.detail and "3/3" in decision.detail
    assert policy.consecutive(1) == 0


def test_counts_windows_per_model_version() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    windows(policy, [True, True], version=1)
    assert policy.on_window(2, ["embedding_mmd"], IDLE).reason == "drift_not_sustained"
    assert policy.consecutive_by_version() == {1: 2, 2: 1}


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (replace(IDLE, new_rows=99), "too_few_new_rows"),
        (replace(IDLE, last_run_started=IDLE.now - 600), "cooldown"),
        (replace(IDLE, runs_last_day=2, last_run_started=IDLE.now - 7200), "daily_limit"),
        (replace(IDLE, run_in_progress=True), "run_in_progress"),
    ],
)
def test_sustained_drift_is_suppressed_with_the_reason(state: TriggerState, reason: str) -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    decision = [policy.on_window(1, ["embedding_mmd"], state) for _ in range(3)][-1]
    assert (decision.outcome, decision.reason) == ("suppressed", reason)
    assert "not starting a run" in decision.detail


def test_fires_once_per_cooldown_while_drift_persists() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    fired_at = []
    last = None
    for minute in range(0, 150):  # drift in every window, one window a minute, for 2.5 hours
        state = replace(IDLE, now=IDLE.now + 60 * minute, last_run_started=last)
        if policy.on_window(1, ["confidence_psi"], state).fired:
            fired_at.append(minute)
            last = state.now
    assert fired_at == [2, 62, 122]  # K=3 windows, then one per 60-minute cooldown


def test_schedule_fires_when_due_and_retries_later_when_blocked() -> None:
    config = CONFIG.model_copy(update={"schedule_interval_s": 3600})
    policy = TriggerPolicy(config, started_at=0)
    assert policy.on_tick(replace(IDLE, now=3599)) is None
    blocked = policy.on_tick(replace(IDLE, now=3600, new_rows=5))
    assert blocked is not None and (blocked.outcome, blocked.reason, blocked.source) == ("suppressed", "too_few_new_rows", "schedule")
    assert policy.on_tick(replace(IDLE, now=3700)) is None  # retried at most every 10 minutes
    fired = policy.on_tick(replace(IDLE, now=4200))
    assert fired is not None and fired.fired and fired.reason == "schedule"
    assert policy.on_tick(replace(IDLE, now=4300, last_run_started=4200)) is None
    assert TriggerPolicy(CONFIG, started_at=0).on_tick(IDLE) is None  # schedule off


def test_manual_request_bypasses_cooldown_and_row_minimum_but_not_a_running_run() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    busy = replace(IDLE, new_rows=0, last_run_started=IDLE.now - 10, runs_last_day=9)
    assert policy.on_manual(busy, "operator").fired
    refused = policy.on_manual(replace(busy, run_in_progress=True), "operator")
    assert (refused.outcome, refused.reason, refused.source) == ("suppressed", "run_in_progress", "manual")


def test_a_drift_run_waits_for_a_burst_of_labels_to_pause_then_starts_on_the_tick() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)  # feedback_quiet_s 10, max_feedback_wait_s 120
    arriving = replace(IDLE, now=1000.0, last_row_stored=999.0)
    for _ in range(2):
        policy.on_window(1, ["embedding_mmd"], arriving)
    waiting = policy.on_window(1, ["embedding_mmd"], arriving)
    assert (waiting.outcome, waiting.reason) == ("suppressed", "feedback_arriving") and policy.armed
    assert policy.on_tick(replace(arriving, now=1005.0)) is None  # the last row is 6 s old
    fired = policy.on_tick(replace(arriving, now=1009.5, last_row_stored=1004.0, new_rows=400))
    assert fired is None or not fired.fired  # a new row 5.5 s ago: still arriving
    started = policy.on_tick(replace(arriving, now=1015.0, last_row_stored=1004.0, new_rows=400))
    assert started is not None and started.fired and started.source == "drift" and "400 new labelled rows" in started.detail
    assert not policy.armed and policy.consecutive(1) == 0


def test_a_steady_trickle_of_labels_holds_a_run_off_only_up_to_the_limit() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    for _ in range(3):
        policy.on_window(1, ["confidence_ks"], replace(IDLE, now=1000.0, last_row_stored=1000.0))
    assert policy.on_tick(replace(IDLE, now=1100.0, last_row_stored=1099.0)) is None
    late = policy.on_tick(replace(IDLE, now=1121.0, last_row_stored=1120.0))
    assert late is not None and late.fired


def test_a_waiting_run_is_dropped_when_something_else_blocks_it() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    for _ in range(3):
        policy.on_window(1, ["confidence_ks"], replace(IDLE, now=1000.0, last_row_stored=1000.0))
    dropped = policy.on_tick(replace(IDLE, now=1001.0, last_row_stored=1000.0, run_in_progress=True))
    assert dropped is not None and (dropped.outcome, dropped.reason) == ("suppressed", "run_in_progress")
    assert not policy.armed


def test_no_quiet_period_starts_at_once() -> None:
    policy = TriggerPolicy(CONFIG.model_copy(update={"feedback_quiet_s": 0}), started_at=0)
    decisions = [policy.on_window(1, ["confidence_ks"], replace(IDLE, now=1000.0, last_row_stored=1000.0))
                 for _ in range(3)]
    assert decisions[-1].fired


def test_a_waiting_run_is_called_off_when_drift_stops() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    for _ in range(3):
        policy.on_window(1, ["input_length_ks"], replace(IDLE, now=1000.0, last_row_stored=1000.0))
    assert policy.armed
    policy.on_window(1, [], replace(IDLE, now=1001.0, last_row_stored=1000.0))
    assert not policy.armed and policy.on_tick(replace(IDLE, now=1100.0, last_row_stored=1000.0)) is None


def test_a_run_is_expected_from_the_first_drifted_window_unless_blocked_by_more_than_half_the_rows() -> None:
    policy = TriggerPolicy(CONFIG, started_at=0)
    quiet = policy.on_window(1, [], IDLE)
    assert not policy.run_expected(quiet, IDLE)
    first = policy.on_window(1, ["embedding_mmd"], replace(IDLE, new_rows=50))
    assert policy.run_expected(first, replace(IDLE, new_rows=50))  # half of M: the rest arrive with drift
    assert not policy.run_expected(first, replace(IDLE, new_rows=49))
    for blocked in (replace(IDLE, last_run_started=IDLE.now - 600), replace(IDLE, run_in_progress=True),
                    replace(IDLE, runs_last_day=2, last_run_started=IDLE.now - 7200)):
        assert not policy.run_expected(first, blocked)
    waiting = TriggerPolicy(CONFIG.model_copy(update={"feedback_quiet_s": 10}), started_at=0)
    arriving = replace(IDLE, last_row_stored=IDLE.now - 1)
    decision = [waiting.on_window(1, ["embedding_mmd"], arriving) for _ in range(3)][-1]
    assert decision.reason == "feedback_arriving" and waiting.run_expected(decision, arriving)

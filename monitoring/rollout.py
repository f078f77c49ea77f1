"""Judging a candidate in shadow or canary on live feedback against the live version.

Shadow compares both models on the very same requests (paired: an exact McNemar test on
the requests where they disagree); canary compares the texts each answered over the same
period (a one-sided Fisher exact test). A stage advances when it has baked long enough, has
enough labelled rows, and the candidate trails by at most `max_accuracy_drop`; the candidate is withdrawn
as soon as the candidate is worse by more than that and significantly so, or when the stage
times out without showing the candidate good enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scipy import stats

from tuneloop.comparison import paired
from tuneloop.config import RolloutConfig
from tuneloop.rollout_stage import RolloutStage

Action = Literal["wait", "advance", "promote", "withdraw"]


@dataclass(frozen=True)
class Comparison:
    paired: bool
    candidate_rows: int
    candidate_accuracy: float
    live_rows: int
    live_accuracy: float
    p_worse: float  # p-value of "the candidate is less accurate than the live version"

    @property
    def drop(self) -> float:
        return self.live_accuracy - self.candidate_accuracy

    def describe(self) -> str:
        how = "same requests" if self.paired else "own traffic"
        return (
            f"live accuracy candidate {self.candidate_accuracy:.3f} (n={self.candidate_rows}) vs live "
            f"{self.live_accuracy:.3f} (n={self.live_rows}, {how}), p(worse)={self.p_worse:.3g}"
        )


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str  # short code: a metric label
    detail: str


def compare_paired(rows: list[tuple[str, str, str]]) -> Comparison:
    """(true, live's, candidate's) label per request both models scored."""
    result = paired([true == served for true, served, _ in rows], [true == shadow for true, _, shadow in rows])
    return Comparison(True, result.rows, result.candidate_accuracy, result.rows, result.reference_accuracy,
                      result.p_worse)


def compare_unpaired(candidate: list[tuple[str, str]], live: list[tuple[str, str]]) -> Comparison:
    """(true, predicted) label per labelled text each version answered."""
    c_right = sum(true == predicted for true, predicted in candidate)
    s_right = sum(true == predicted for true, predicted in live)
    if candidate and live:
        table = [[c_right, len(candidate) - c_right], [s_right, len(live) - s_right]]
        p_worse = float(stats.fisher_exact(table, alternative="less").pvalue)
    else:
        p_worse = 1.0
    return Comparison(
        False, len(candidate), c_right / len(candidate) if candidate else 0.0,
        len(live), s_right / len(live) if live else 0.0, p_worse,
    )


def judge(config: RolloutConfig, stage: RolloutStage, elapsed_s: float, comparison: Comparison) -> Verdict:
    """What to do with a stage that has run `elapsed_s` seconds."""
    last = stage == config.stages[-1] if stage in config.stages else True
    enough = min(comparison.candidate_rows, comparison.live_rows) >= config.min_feedback_rows
    timed_out = elapsed_s >= config.stage_timeout_s
    figures = comparison.describe()
    if not enough:
        if timed_out:
            return Verdict("withdraw", "timeout", f"{stage} timed out with too little feedback: {figures}")
        return Verdict("wait", "too_few_rows", f"{config.min_feedback_rows} labelled rows needed: {figures}")
    worse = comparison.drop > config.max_accuracy_drop
    if worse and comparison.p_worse < config.alpha:
        return Verdict("withdraw", "worse", f"candidate worse than live beyond {config.max_accuracy_drop:g}: {figures}")
    if not worse and elapsed_s >= config.bake_s:
        return Verdict("promote" if last else "advance", "good", f"{stage} baked {elapsed_s:.0f} s: {figures}")
    if timed_out:
        return Verdict("withdraw", "timeout", f"{stage} timed out without showing the candidate good enough: {figures}")
    return Verdict("wait", "baking" if not worse else "trailing", f"{stage} for {elapsed_s:.0f} s: {figures}")

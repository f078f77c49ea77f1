"""The rollout judge: paired and unpaired comparisons, and when a stage advances or the candidate is withdrawn."""

from __future__ import annotations

import pytest

from monitoring.rollout import compare_paired, compare_unpaired, judge
from tuneloop.config import RolloutConfig

CONFIG = RolloutConfig(stages=["shadow", "canary"], bake_s=600, min_feedback_rows=100, max_accuracy_drop=0.02,
                       stage_timeout_s=3600)


def pairs(both_right: int, only_live: int, only_candidate: int, both_wrong: int) -> list[tuple[str, str, str]]:
    return ([("a", "a", "a")] * both_right + [("a", "a", "b")] * only_live + [("a", "b", "a")] * only_candidate
            + [("a", "b", "b")] * both_wrong)


def labelled(right: int, wrong: int) -> list[tuple[str, str]]:
    return [("a", "a")] * right + [("a", "b")] * wrong


def test_paired_comparison_counts_each_request_for_both_models() -> None:
    comparison = compare_paired(pairs(150, 30, 5, 15))
    assert comparison.paired and comparison.candidate_rows == comparison.live_rows == 200
    assert comparison.live_accuracy == pytest.approx(180 / 200)
    assert comparison.candidate_accuracy == pytest.approx(155 / 200)
    assert comparison.p_worse < 1e-4  # 30 of 35 disagreements go the live version's way
    assert compare_paired(pairs(150, 5, 30, 15)).p_worse > 0.99


def test_unpaired_comparison_uses_each_versions_own_traffic() -> None:
    worse = compare_unpaired(labelled(70, 30), labelled(900, 100))
    assert (worse.candidate_accuracy, worse.live_accuracy) == (0.7, 0.9)
    assert worse.p_worse < 1e-4
    assert compare_unpaired(labelled(90, 10), labelled(900, 100)).p_worse > 0.3
    assert compare_unpaired([], labelled(10, 0)).p_worse == 1.0


def test_a_stage_waits_for_rows_then_advances_after_baking() -> None:
    few = compare_paired(pairs(40, 1, 1, 8))
    assert judge(CONFIG, "shadow", 3000, few).action == "wait"
    good = compare_paired(pairs(170, 3, 10, 17))
    assert judge(CONFIG, "shadow", 100, good).action == "wait"  # not baked yet
    assert judge(CONFIG, "shadow", 700, good).action == "advance"
    assert judge(CONFIG, "canary", 700, compare_unpaired(labelled(90, 10), labelled(880, 120))).action == "promote"


def test_a_significantly_worse_candidate_rolls_back_before_baking_ends() -> None:
    verdict = judge(CONFIG, "shadow", 10, compare_paired(pairs(150, 30, 5, 15)))
    assert (verdict.action, verdict.reason) == ("withdraw", "worse")
    assert "candidate 0.775" in verdict.detail and "live 0.900" in verdict.detail


def test_a_trailing_candidate_keeps_baking_until_the_stage_times_out() -> None:
    trailing = compare_unpaired(labelled(86, 14), labelled(900, 100))  # 4 points behind, not significant
    assert judge(CONFIG, "canary", 700, trailing).reason == "trailing"
    assert judge(CONFIG, "canary", 3600, trailing).action == "withdraw"
    assert judge(CONFIG, "canary", 3600, compare_unpaired(labelled(5, 0), labelled(5, 0))).reason == "timeout"


def test_a_stage_outside_the_configured_ones_is_the_last() -> None:
    config = RolloutConfig(stages=[], bake_s=0, min_feedback_rows=10)
    assert judge(config, "shadow", 1, compare_paired(pairs(20, 0, 0, 0))).action == "promote"


def test_stages_must_be_shadow_then_canary() -> None:
    with pytest.raises(ValueError, match="shadow first"):
        RolloutConfig(stages=["canary", "shadow"])

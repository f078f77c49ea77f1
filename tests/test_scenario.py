"""trainer/scenario.py: deterministic selections of the shipped data that never overlap where they must not.

(The reduced scenario suite itself, the loop over HTTP, is tests/test_scenarios.py.)
"""

from __future__ import annotations

from collections import Counter

from trainer import scenario


def test_skip_leaves_out_exactly_what_the_same_sample_took() -> None:
    taken = scenario.sample(scenario.OLD_DOMAINS, "train", 30, seed=0)
    rest = scenario.sample(scenario.OLD_DOMAINS, "train", None, seed=0, skip=30)
    everything = scenario.sample(scenario.OLD_DOMAINS, "train", None, seed=0)
    assert set(Counter(taken.labels).values()) == {30}
    assert not set(zip(taken.texts, taken.labels, strict=True)) & set(zip(rest.texts, rest.labels, strict=True))
    assert sorted(taken.texts + rest.texts) == sorted(everything.texts)


def test_a_drawn_clinc_split_keeps_feedback_and_test_rows_apart_from_v1s() -> None:
    drawn = scenario.clinc(seed=4)
    old, new = set(drawn.bootstrap.labels), set(drawn.feedback.labels)
    assert len(old) == len(new) == 45 and not old & new
    assert drawn.labels[: len(old)] == scenario.domain_labels(tuple(drawn.name.split()[1].split("+")))
    assert not set(drawn.bootstrap.texts) & set(drawn.test_old.texts)
    assert scenario.clinc(seed=4).feedback.texts == drawn.feedback.texts  # the same draw every time

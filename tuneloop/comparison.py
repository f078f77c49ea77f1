"""Two models judged on the very same rows: accuracies, their paired difference, and whether one is worse.

Paired rows carry far more information than two separate accuracies: only the rows where exactly
one model is right can tell them apart. The exact McNemar test (a binomial test on those rows)
gives the p-value of "the candidate is less accurate"; the interval is the normal approximation of
the mean paired difference. The validation gate and the rollout judge both decide with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Paired:
    rows: int
    reference_accuracy: float
    candidate_accuracy: float
    only_reference: int  # rows only the reference model got right
    only_candidate: int  # rows only the candidate got right
    p_worse: float  # p-value of "the candidate is less accurate than the reference"
    drop_ci95: tuple[float, float]  # interval of reference minus candidate accuracy

    @property
    def drop(self) -> float:
        return self.reference_accuracy - self.candidate_accuracy

    def worse_beyond(self, tolerance: float, alpha: float) -> bool:
        """Worse by more than `tolerance` and significantly worse at level `alpha`: small sets cannot fail by chance."""
        return self.drop > tolerance and self.p_worse < alpha

    def as_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "reference": round(self.reference_accuracy, 4),
            "candidate": round(self.candidate_accuracy, 4),
            "drop": round(self.drop, 4),
            "drop_ci95": [round(x, 4) for x in self.drop_ci95],
            "only_reference_right": self.only_reference,
            "only_candidate_right": self.only_candidate,
            "p_worse": float(f"{self.p_worse:.4g}"),
        }


def paired(reference_right: Sequence[bool], candidate_right: Sequence[bool]) -> Paired:
    """Compare two models from whether each was right on each row."""
    if len(reference_right) != len(candidate_right):
        raise ValueError(f"paired rows differ in number: {len(reference_right)} vs {len(candidate_right)}")
    n = len(reference_right)
    only_reference = sum(r and not c for r, c in zip(reference_right, candidate_right, strict=True))
    only_candidate = sum(c and not r for r, c in zip(reference_right, candidate_right, strict=True))
    discordant = only_reference + only_candidate
    p_worse = stats.binomtest(only_reference, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    if n == 0:
        return Paired(0, 0.0, 0.0, 0, 0, 1.0, (0.0, 0.0))
    drop = (only_reference - only_candidate) / n
    # Variance of the per-row difference (values -1, 0, 1).
    variance = max(discordant / n - drop * drop, 0.0)
    half = 1.96 * math.sqrt(variance / n)
    return Paired(
        n, sum(reference_right) / n, sum(candidate_right) / n, only_reference, only_candidate, float(p_worse),
        (drop - half, drop + half),
    )

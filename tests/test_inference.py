from __future__ import annotations

import numpy as np
import pytest

from tuneloop.inference import length_groups


def expand(groups: list[slice], n: int) -> list[int]:
    return [i for g in groups for i in range(n)[g]]


@pytest.mark.parametrize("waste", [0.0, 0.25, 0.5, 10.0])
@pytest.mark.parametrize("max_rows", [None, 1, 3])
def test_length_groups_cover_every_row_once_within_bounds(waste: float, max_rows: int | None) -> None:
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(3, 120, size=97))
    groups = length_groups(lengths, waste, max_rows)
    assert expand(groups, len(lengths)) == list(range(len(lengths)))
    for group in groups:
        rows = lengths[group]
        assert len(rows) >= 1
        if max_rows is not None:
            assert len(rows) <= max_rows
        if len(rows) > 1:  # a group is only widened while its padding stays within the bound
            assert len(rows) * rows.max() <= (1 + waste) * rows.sum() + 1e-9


def test_equal_lengths_form_one_group_and_outliers_split_off() -> None:
    assert length_groups(np.array([10, 10, 10, 10]), 0.0) == [slice(0, 4)]
    groups = length_groups(np.array([5, 5, 6, 100]), 0.25)
    assert groups[-1] == slice(3, 4)


def test_providers_prefer_cuda_only_when_onnxruntime_offers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU exists on CI machines, so ONNX Runtime's provider list is faked here; the real
    # CPU-only list is checked by the first assertion.
    from tuneloop import inference

    if "CUDAExecutionProvider" not in inference.ort.get_available_providers():
        assert inference.choose_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            inference.choose_providers("cuda")
    monkeypatch.setattr(
        inference.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert inference.choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert inference.choose_providers("cpu") == ["CPUExecutionProvider"]

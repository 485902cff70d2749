"""The ML.ENERGY reference used by the plausibility check: exact at measured batches,
monotone between them, P * ITL / batch below the smallest, None for unknown models."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.simulator.calibration import MODELS
from pipelines.allocation_report import mlenergy_j_per_token, plausible


@pytest.mark.parametrize("model", sorted(MODELS))
def test_measured_batches_give_the_measured_figure(model: str) -> None:
    profile = MODELS[model]
    for batch, figure in zip(profile.batch, profile.j_per_token, strict=True):
        reference = mlenergy_j_per_token(model, batch)
        assert reference is not None
        assert reference.j_per_token == pytest.approx(figure, rel=1e-12)


@given(model=st.sampled_from(sorted(MODELS)), low=st.floats(1.0, 500.0), step=st.floats(0.1, 50))
def test_figure_falls_as_batch_grows(model: str, low: float, step: float) -> None:
    a = mlenergy_j_per_token(model, low)
    b = mlenergy_j_per_token(model, low + step)
    assert a is not None and b is not None
    assert b.j_per_token <= a.j_per_token * (1 + 1e-12)


@pytest.mark.parametrize("batch", [1.0, 2.5, 4.0, 7.9])
def test_below_batch_eight_a_decode_step_is_shared_by_the_batch(batch: float) -> None:
    profile = MODELS["llama-3.1-8b"]
    reference = mlenergy_j_per_token("llama-3.1-8b", batch)
    assert reference is not None and reference.note.startswith("extrapolated")
    assert reference.j_per_token == pytest.approx(profile.j_per_token[0] * 8.0 / batch)
    # The measured batch-8 figure is P * ITL / 8 to within 3 %: the model holds there.
    step_j = profile.power_w[0] * profile.itl_ms[0] / 1000.0
    assert step_j / 8.0 == pytest.approx(profile.j_per_token[0], rel=0.03)


def test_unknown_model_or_batch_has_no_reference() -> None:
    assert mlenergy_j_per_token("mistral-7b", 8.0) is None
    assert mlenergy_j_per_token("llama-3.1-8b", 0.0) is None


def test_plausible_range() -> None:
    assert plausible(1.0) is True
    assert plausible(0.5) is False
    assert plausible(3.0) is False
    assert plausible(None) is None
    assert plausible(math.nan) is None

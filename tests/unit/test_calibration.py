"""The simulator's power and timing land on the published measurements."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ingest.simulator.calibration import (
    GPU_TYPES,
    MLENERGY_CHAT_PROMPT_TOKENS,
    MODELS,
    PREFILL_POWER_FRACTION,
    DecodeCurve,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
H100 = GPU_TYPES["H100"]
A100 = GPU_TYPES["A100"]
#: Loaded idle power per GPU assumed when rebuilding the measured curve.
IDLE_W = 115.0


def decode_j_per_token(name: str, batch: np.ndarray, gpu=H100) -> np.ndarray:  # type: ignore[no-untyped-def]
    model = MODELS[name]
    idle_total = IDLE_W * model.reference_tp
    curve = DecodeCurve.build(model, gpu, model.reference_tp, idle_total)
    power = idle_total + curve.dynamic_power_w(batch)
    return power * curve.iteration_s(batch) / batch


def chat_j_per_token(name: str, batch: np.ndarray) -> np.ndarray:
    """Decode plus the prefill of a chat-sized prompt, per output token, as ML.ENERGY
    measures it (energy over a steady-state run divided by output tokens)."""
    model = MODELS[name]
    tp = model.reference_tp
    prefill_s = model.prefill_ms_per_token(tp, H100) * 1e-3 * MLENERGY_CHAT_PROMPT_TOKENS
    prefill_j = PREFILL_POWER_FRACTION * H100.power_limit_w * tp * prefill_s
    output_tokens = float(np.mean([350.0, 400.0]))  # the table's avg_output_len, 350-640
    return decode_j_per_token(name, batch) + prefill_j / output_tokens


@pytest.mark.parametrize("name", sorted(MODELS))
def test_energy_per_output_token_matches_ml_energy(name: str) -> None:
    """At each measured batch size, J per output token is within 15 % of ML.ENERGY."""
    model = MODELS[name]
    batch = np.asarray(model.batch)
    measured = np.asarray(model.j_per_token)
    simulated = chat_j_per_token(name, batch)
    np.testing.assert_allclose(simulated, measured, rtol=0.15)
    # Decode alone never costs more than the measurement, which includes prefill.
    np.testing.assert_array_less(decode_j_per_token(name, batch), measured * 1.06)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_power_grows_sublinearly_and_energy_per_token_falls_with_batch(name: str) -> None:
    model = MODELS[name]
    curve = DecodeCurve.build(model, H100, model.reference_tp, IDLE_W * model.reference_tp)
    batch = np.array([1.0, 2, 4, 8, 16, 32, 64, 128, 256])
    dynamic = curve.dynamic_power_w(batch)
    assert (np.diff(dynamic) >= -1e-9).all()
    assert (dynamic[1:] < 2 * dynamic[:-1]).all()  # doubling the batch < doubles power
    per_token = decode_j_per_token(name, batch)
    assert (np.diff(per_token) < 0).all()
    # Below one sequence of concurrency the replica idles part of the time.
    assert curve.dynamic_power_w(np.array([0.5]))[0] == pytest.approx(dynamic[0] / 2)
    assert curve.dynamic_power_w(np.array([0.0]))[0] == 0.0


def test_a100_is_slower_and_never_exceeds_its_power_limit() -> None:
    model = MODELS["llama-3.1-70b"]
    h100 = DecodeCurve.build(model, H100, 4, 4 * IDLE_W)
    a100 = DecodeCurve.build(model, A100, 4, 4 * 70.0)
    batch = np.array([1.0, 8, 64, 512])
    np.testing.assert_allclose(a100.iteration_s(batch) / h100.iteration_s(batch), 1.5)
    assert (4 * 70.0 + a100.dynamic_power_w(batch) <= 4 * A100.power_limit_w + 1e-9).all()
    # Splitwise A100 llama2-70b TP4, batch 1-16: normalised average power 0.59-0.64.
    per_gpu = (4 * 70.0 + a100.dynamic_power_w(np.array([8.0]))) / 4
    assert 0.55 <= per_gpu[0] / A100.power_limit_w <= 0.70


def test_prefill_time_per_token_follows_splitwise() -> None:
    """llama2-70b TP4 on H100 prefills ~0.116 ms per prompt token (Splitwise)."""
    model = MODELS["llama-3.1-70b"]
    assert model.prefill_ms_per_token(4, H100) == pytest.approx(0.116 * 70.6 / 70, rel=1e-6)
    assert model.prefill_ms_per_token(4, A100) == pytest.approx(
        2 * model.prefill_ms_per_token(4, H100)
    )
    assert model.prefill_ms_per_token(8, H100) < model.prefill_ms_per_token(4, H100)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the checkout")
def test_carried_figures_equal_the_reference_files() -> None:
    """Guards against a typo when the ML.ENERGY figures were copied into code."""
    rows = list(csv.DictReader((SHARED / "mlenergy_h100_chat.csv").open()))
    names = {
        "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", 1),
        "qwen3-14b": ("Qwen/Qwen3-14B", 1),
        "qwen3-32b": ("Qwen/Qwen3-32B", 2),
        "llama-3.1-70b": ("meta-llama/Llama-3.1-70B-Instruct", 4),
    }
    for name, (model_id, gpus) in names.items():
        measured = {
            round(float(r["avg_batch_size"]), 1): r
            for r in rows
            if r["model_id"] == model_id and int(r["num_gpus"]) == gpus
        }
        model = MODELS[name]
        for batch, power, itl, jpt in zip(
            model.batch, model.power_w, model.itl_ms, model.j_per_token, strict=True
        ):
            row = measured[batch]
            assert float(row["avg_power_watts"]) == pytest.approx(power, abs=0.06)
            assert float(row["median_itl_ms"]) == pytest.approx(itl, abs=0.006)
            assert float(row["energy_per_token_joules"]) == pytest.approx(jpt, abs=6e-5)

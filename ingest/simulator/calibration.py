"""Measured figures the simulator is calibrated on, carried into code with their source.

The project never reads `../shared/data` at run time; the figures it uses are copied
here, each table naming its file and rows.

Sources
- ML.ENERGY leaderboard v3 (Dec 2025), task lm-arena-chat, H100 SXM, vLLM, steady state,
  GPU energy only (`mlenergy_h100_chat.csv`): per model and batch size, average power of
  all GPUs of the replica, median inter-token latency, and J per output token.
- Microsoft Splitwise `data/perf_model.csv` (MIT; `splitwise_perf_model.csv`): prefill
  time against prompt size, per-token decode time against batch size, and normalised
  power, for llama2-70b and bloom-176b on A100-80GB and H100-80GB.
- DESIGN.md reference figures: H100 SXM 700 W limit, ~70 W idle with no process (up to
  ~145 W with a model loaded); A100 SXM 80 GB 400 W limit, ~55 W idle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class GpuType:
    """A GPU model as dcgm-exporter reports it, with its power envelope."""

    key: str
    model_name: str  # dcgm-exporter `modelName` label
    power_limit_w: float
    idle_no_process_w: float
    #: Range of idle power with a model loaded and no request running (per GPU draw).
    idle_loaded_w: tuple[float, float]
    fb_total_mib: int
    sm_clock_max_mhz: int
    sm_clock_idle_mhz: int
    #: Decode inter-token latency relative to H100 (Splitwise llama2-70b, batch 1-16:
    #: A100/H100 = 44.5/29.4 ms at TP4, 59.9/37.1 at TP2, 45.0/30.6 at TP8 -> 1.5).
    decode_time_factor: float
    #: Prefill time relative to H100 (Splitwise llama2-70b TP4: 403/201 ms at 2048
    #: prompt tokens, 127/60 ms at 512 -> 2.0).
    prefill_time_factor: float


GPU_TYPES: dict[str, GpuType] = {
    "H100": GpuType(
        key="H100",
        model_name="NVIDIA H100 80GB HBM3",
        power_limit_w=700.0,
        idle_no_process_w=70.0,
        idle_loaded_w=(95.0, 135.0),
        fb_total_mib=81559,
        sm_clock_max_mhz=1980,
        sm_clock_idle_mhz=345,
        decode_time_factor=1.0,
        prefill_time_factor=1.0,
    ),
    "A100": GpuType(
        key="A100",
        model_name="NVIDIA A100-SXM4-80GB",
        power_limit_w=400.0,
        idle_no_process_w=55.0,
        # No A100 loaded-idle figure in the references: the H100's loaded/no-process
        # ratio (95-135 W over 70 W) applied to the A100's 55 W.
        idle_loaded_w=(75.0, 106.0),
        fb_total_mib=81920,
        sm_clock_max_mhz=1410,
        sm_clock_idle_mhz=210,
        decode_time_factor=1.5,
        prefill_time_factor=2.0,
    ),
}

#: Power during prefill as a fraction of the power limit. Splitwise's normalised peak
#: power for llama2-70b prompts of 512+ tokens on A100 is 1.00-1.09 of TDP.
PREFILL_POWER_FRACTION = 0.95

#: Prefill time per prompt token of llama2-70b, TP4, H100 (Splitwise medians, batch 1:
#: 59.7 ms at 512 tokens, 953.6 ms at 8192 -> 0.116 ms/token, nearly linear).
PREFILL_MS_PER_TOKEN_70B_TP4_H100 = 0.116
#: Tensor-parallel speed-up exponent for prefill: Splitwise llama2-70b on H100 at 2048
#: tokens takes 310 / 201 / 137 ms at TP2 / TP4 / TP8, 1.5x per doubling -> 2**0.6.
PREFILL_TP_EXPONENT = 0.6


@dataclass(frozen=True)
class ModelProfile:
    """A served model: size, and its measured H100 decode curve from ML.ENERGY."""

    name: str
    version: str
    params_b: float
    #: Prompt length at which attention FLOPs equal the dense FLOPs over a causal
    #: prompt (2 * params / (4 * layers * d_model), doubled for causality).
    attention_tokens: float
    #: Tensor-parallel degree the ML.ENERGY measurement used.
    reference_tp: int
    #: ML.ENERGY rows: average batch size, replica power (W, all GPUs), median ITL (ms),
    #: measured J per output token.
    batch: tuple[float, ...]
    power_w: tuple[float, ...]
    itl_ms: tuple[float, ...]
    j_per_token: tuple[float, ...]
    source: str

    def prefill_ms_per_token(self, tp: int, gpu: GpuType) -> float:
        scale = (self.params_b / 70.0) * (4.0 / tp) ** PREFILL_TP_EXPONENT
        return PREFILL_MS_PER_TOKEN_70B_TP4_H100 * scale * gpu.prefill_time_factor


MODELS: dict[str, ModelProfile] = {
    "llama-3.1-8b": ModelProfile(
        name="llama-3.1-8b",
        version="1",
        params_b=8.0,
        attention_tokens=61_000.0,
        reference_tp=1,
        batch=(8.0, 16.0, 31.9, 63.9, 95.7, 127.6, 191.7, 255.2, 383.0, 510.9),
        power_w=(486.4, 513.3, 559.7, 610.3, 644.0, 669.2, 688.3, 690.5, 686.5, 688.3),
        itl_ms=(7.32, 7.91, 8.91, 11.50, 14.08, 16.48, 20.91, 26.13, 37.70, 47.41),
        j_per_token=(
            0.4548,
            0.2627,
            0.1651,
            0.1186,
            0.1029,
            0.0951,
            0.0837,
            0.0766,
            0.0742,
            0.0702,
        ),
        source="ML.ENERGY v3 meta-llama/Llama-3.1-8B-Instruct, 1x H100",
    ),
    "qwen3-14b": ModelProfile(
        name="qwen3-14b",
        version="1",
        params_b=14.8,
        attention_tokens=72_000.0,
        reference_tp=1,
        batch=(8.0, 16.0, 31.9, 63.8, 95.9, 127.7, 191.7, 253.4),
        power_w=(443.0, 465.3, 493.9, 525.0, 541.8, 572.1, 612.8, 644.7),
        itl_ms=(12.54, 13.34, 15.01, 18.94, 23.50, 26.16, 33.37, 38.40),
        j_per_token=(0.7061, 0.3983, 0.2441, 0.1672, 0.1435, 0.1279, 0.1154, 0.1119),
        source="ML.ENERGY v3 Qwen/Qwen3-14B, 1x H100",
    ),
    "qwen3-32b": ModelProfile(
        name="qwen3-32b",
        version="1",
        params_b=32.8,
        attention_tokens=100_000.0,
        reference_tp=2,
        batch=(8.0, 16.0, 31.9, 63.9, 95.8, 127.8, 191.7, 255.6),
        power_w=(850.1, 882.8, 944.5, 974.1, 1022.0, 1073.7, 1143.1, 1177.9),
        itl_ms=(15.06, 16.04, 17.91, 22.45, 26.10, 29.66, 37.02, 44.45),
        j_per_token=(1.6271, 0.9099, 0.5536, 0.3671, 0.3046, 0.2749, 0.2484, 0.2285),
        source="ML.ENERGY v3 Qwen/Qwen3-32B, 2x H100 (TP2)",
    ),
    "llama-3.1-70b": ModelProfile(
        name="llama-3.1-70b",
        version="1",
        params_b=70.6,
        attention_tokens=107_000.0,
        reference_tp=4,
        batch=(8.0, 16.0, 31.9, 63.8, 95.7, 127.6, 191.6, 255.3, 383.0, 510.5),
        power_w=(1765.4, 1803.8, 1794.2, 2001.5, 2101.5, 2183.8, 2293.1, 2354.3, 2343.5, 2492.9),
        itl_ms=(16.57, 17.70, 20.05, 22.43, 25.36, 27.87, 33.70, 39.84, 55.12, 73.89),
        j_per_token=(
            3.7587,
            2.0910,
            1.2069,
            0.7972,
            0.6478,
            0.5634,
            0.5140,
            0.4790,
            0.4406,
            0.4210,
        ),
        source="ML.ENERGY v3 meta-llama/Llama-3.1-70B-Instruct, 4x H100 (TP4)",
    ),
}


#: Mean prompt length behind the ML.ENERGY chat figures, inferred from them: measured
#: throughput falls short of batch / ITL by the time spent in prefill, 3.7 ms per
#: request for Llama-3.1-8B at batch 511 and 17 ms for Llama-3.1-70B at batch 192 —
#: 115-150 prompt tokens at this module's prefill speeds. Used to compare like with like.
MLENERGY_CHAT_PROMPT_TOKENS = 150


@dataclass(frozen=True)
class DecodeCurve:
    """Decode iteration time and replica power against batch size, for one replica.

    Built from the model's ML.ENERGY curve, rescaled to the replica's GPU type and
    tensor-parallel degree, and to its own (simulated) loaded-idle power.

    Dynamic power (above loaded idle) is a power law in the batch, `a * batch**k`,
    fitted to the measured points in log-log space: smooth, increasing and sublinear
    (k is 0.07-0.15 for the four models), where the raw measurements wobble by a few
    per cent. Below one sequence of average concurrency the replica is busy only part
    of the time, so dynamic power scales linearly with concurrency there. Iteration
    time is interpolated linearly in the batch and extrapolated at both ends.
    """

    batch: FloatArray
    itl_s: FloatArray
    scale_w: float
    exponent: float
    max_dynamic_w: float

    @classmethod
    def build(cls, model: ModelProfile, gpu: GpuType, tp: int, idle_w_total: float) -> DecodeCurve:
        batch = np.asarray(model.batch)
        # Per-GPU power as a fraction of the H100 limit carries across GPU types: the
        # ML.ENERGY H100 70B TP4 curve gives 0.63 of TDP at batch 8, and Splitwise's
        # A100 llama2-70b TP4 normalised average power is 0.59-0.64 at batch 1-16.
        per_gpu_w = np.asarray(model.power_w) / model.reference_tp
        per_gpu_w = per_gpu_w * (gpu.power_limit_w / GPU_TYPES["H100"].power_limit_w)
        max_dynamic_w = max(gpu.power_limit_w * tp - idle_w_total, 1.0)
        dynamic_w = np.clip(per_gpu_w * tp - idle_w_total, 1.0, max_dynamic_w)
        exponent, log_scale = np.polyfit(np.log(batch), np.log(dynamic_w), 1)
        exponent = float(min(max(exponent, 0.02), 1.0))
        # More GPUs per replica than measured: each does less work per token.
        tp_speedup = (tp / model.reference_tp) ** PREFILL_TP_EXPONENT
        itl_s = np.asarray(model.itl_ms) / 1000.0 * gpu.decode_time_factor / tp_speedup
        return cls(batch, itl_s, float(np.exp(log_scale)), exponent, max_dynamic_w)

    def iteration_s(self, batch: FloatArray) -> FloatArray:
        """Decode iteration time; linear in batch, extrapolated at both ends."""
        b = np.maximum(np.asarray(batch, dtype=np.float64), 1.0)
        x = self.batch
        slope_lo = (self.itl_s[1] - self.itl_s[0]) / (x[1] - x[0])
        slope_hi = (self.itl_s[-1] - self.itl_s[-2]) / (x[-1] - x[-2])
        inside = np.interp(b, x, self.itl_s)
        below = self.itl_s[0] + (b - x[0]) * slope_lo
        above = self.itl_s[-1] + (b - x[-1]) * slope_hi
        out = np.where(b < x[0], below, np.where(b > x[-1], above, inside))
        return np.maximum(out, 0.5 * self.itl_s[0])

    def dynamic_power_w(self, concurrency: FloatArray) -> FloatArray:
        """Replica dynamic power (above loaded idle) at a time-averaged concurrency."""
        b = np.asarray(concurrency, dtype=np.float64)
        law = np.minimum(
            self.scale_w * np.power(np.maximum(b, 1.0), self.exponent), self.max_dynamic_w
        )
        return np.where(b < 1.0, self.scale_w * np.clip(b, 0.0, 1.0), law)

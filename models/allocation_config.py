"""Configuration of the allocation method (ALLOCATION.md), validated, with sourced defaults.

One YAML file (`gpuledger allocation` reads `settings.allocation_file`, default
`<state_dir>/allocation.yaml` when present) holds every number the method uses; what
it does not set keeps the defaults below. The values reach the dbt models as vars.

Defaults and where they come from
- Prefill/decode weights (`w_prefill`, `w_decode`; ALLOCATION.md §3): `w_decode = 1`.
  `w_prefill` is the energy of prefilling one prompt token over the energy of decoding
  one output token, per model, at batch 8 (the smallest batch ML.ENERGY measured, and
  what replicas under moderate load run): prefill time per token from Microsoft
  Splitwise (llama2-70b TP4 on H100: 0.116 ms per prompt token, scaled by parameter
  count and TP degree) at near the power limit (Splitwise: 0.95-1.0 of TDP during
  prefill), over ML.ENERGY's decode inter-token latency / batch at its measured power
  (dynamic part, above an idle of 110 W per GPU). With `learn_prefill_weight` on (the
  default), the ratio is instead fitted per model and GPU type on the hour's own
  slices and these figures are the fallback.
- Idle power per GPU model (§2): the reference figures put an H100 SXM at ~70 W with no
  process and up to ~145 W with a model loaded; 115 W is the middle of 85-145 W, a
  loaded GPU's range. An A100 SXM 80 GB idles at ~55 W with no process; scaled by the
  same loaded/no-process ratio (115 / 70) that is 90 W. With `learn_idle_power` on, a
  GPU's idle power is the `idle_percentile` of its slice power over slices with no
  request (when it has at least `min_idle_slices` of them in the hour).
- Gap limit (§1): 3 × the scrape interval.
- Idle policy (§5): `separate`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IdlePolicy = Literal["separate", "absorb", "share"]
GapEnergy = Literal["power_integral", "counter"]


class ModelWeights(BaseModel):
    """Work per token of one model: w_prefill per uncached prompt token, w_decode per
    completion token (only their ratio matters within a slice)."""

    model_config = ConfigDict(extra="forbid")

    w_prefill: float = Field(gt=0, le=100)
    w_decode: float = Field(default=1.0, gt=0, le=100)


#: Default weights per served model (see the module docstring for the derivation).
DEFAULT_MODEL_WEIGHTS: dict[str, ModelWeights] = {
    "llama-3.1-8b": ModelWeights(w_prefill=0.049),
    "qwen3-14b": ModelWeights(w_prefill=0.060),
    "qwen3-32b": ModelWeights(w_prefill=0.077),
    "llama-3.1-70b": ModelWeights(w_prefill=0.095),
}
#: For a model the configuration does not name.
FALLBACK_WEIGHTS = ModelWeights(w_prefill=0.06)

#: Idle power (W) per dcgm-exporter `modelName` (see the module docstring).
DEFAULT_IDLE_POWER_W: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 115.0,
    "NVIDIA A100-SXM4-80GB": 90.0,
}
FALLBACK_IDLE_POWER_W = 100.0


class AllocationConfig(BaseModel):
    """Every number of the allocation method."""

    model_config = ConfigDict(extra="forbid")

    idle_policy: IdlePolicy = "separate"
    scrape_interval_s: float = Field(default=15.0, gt=0, le=3600)
    gap_limit_factor: float = Field(default=3.0, ge=1, le=100)
    #: ALLOCATION.md estimates a gap slice's energy from power like a missing counter.
    #: `counter` keeps the counter's increase across a gap when it did not reset (it
    #: keeps counting while scrapes are lost); the slice is flagged as a gap either way.
    gap_energy: GapEnergy = "power_integral"
    model_weights: dict[str, ModelWeights] = Field(
        default_factory=lambda: dict(DEFAULT_MODEL_WEIGHTS)
    )
    default_weights: ModelWeights = FALLBACK_WEIGHTS
    learn_prefill_weight: bool = True
    min_fit_slices: int = Field(default=200, ge=10, description="slices per fit, at least")
    idle_power_w: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_IDLE_POWER_W))
    default_idle_power_w: float = Field(default=FALLBACK_IDLE_POWER_W, gt=0, le=2000)
    learn_idle_power: bool = True
    idle_percentile: float = Field(default=0.05, ge=0, le=0.5)
    min_idle_slices: int = Field(default=20, ge=1)
    #: Requests longer than this are not looked for beyond the hour being allocated.
    max_request_s: float = Field(default=3600.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _idle_powers_positive(self) -> AllocationConfig:
        for gpu_model, watts in self.idle_power_w.items():
            if not 0 < watts <= 2000:
                raise ValueError(f"idle_power_w[{gpu_model!r}]: {watts} W is not in (0, 2000]")
        return self

    @property
    def gap_limit_s(self) -> float:
        return self.gap_limit_factor * self.scrape_interval_s

    def dbt_vars(self, window_start: str, window_end: str, usage_topic: str) -> dict[str, Any]:
        """The dbt vars of one allocation window (ISO hours, UTC)."""
        return {
            "min_hour": window_start,
            "max_hour": window_end,
            "usage_topic": usage_topic,
            "idle_policy": self.idle_policy,
            "gap_limit_s": self.gap_limit_s,
            "gap_energy": self.gap_energy,
            "model_weights": [
                {"model": name, "w_prefill": w.w_prefill, "w_decode": w.w_decode}
                for name, w in sorted(self.model_weights.items())
            ],
            "default_w_prefill": self.default_weights.w_prefill,
            "default_w_decode": self.default_weights.w_decode,
            "learn_prefill_weight": self.learn_prefill_weight,
            "min_fit_slices": self.min_fit_slices,
            "idle_power_w": [
                {"gpu_model": name, "watts": watts}
                for name, watts in sorted(self.idle_power_w.items())
            ],
            "default_idle_power_w": self.default_idle_power_w,
            "learn_idle_power": self.learn_idle_power,
            "idle_percentile": self.idle_percentile,
            "min_idle_slices": self.min_idle_slices,
            "max_request_s": self.max_request_s,
        }

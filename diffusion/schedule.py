"""The discrete-time variance-preserving noise schedule of a teacher, read from its scheduler config.

Notation (Ho et al. 2020; Kingma et al. 2021): z_t = a_t x0 + sigma_t eps with
a_t = sqrt(alphabar_t) and sigma_t = sqrt(1 - alphabar_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _broadcast(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast against `like`, in `like`'s dtype and device."""
    picked = values.to(t.device)[t.long()]
    return picked.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass(frozen=True)
class NoiseSchedule:
    """alphabar_t, beta_t for t = 0..T-1, and the teacher's prediction type."""

    alphabar: torch.Tensor  # float64, shape (T,)
    betas: torch.Tensor  # float64, shape (T,)
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Use diffusers' own beta computation (linear, scaled_linear, squaredcos_cap_v2, ...)."""
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        betas = ddpm.betas.to(torch.float64)
        return cls(alphabar=torch.cumprod(1.0 - betas, dim=0), betas=betas, prediction_type=prediction_type)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphabar.shape[0])

    def a(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """a_t = sqrt(alphabar_t), broadcast against `like`."""
        return _broadcast(self.alphabar.sqrt(), t, like)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(1 - alphabar_t), broadcast against `like`."""
        return _broadcast((1.0 - self.alphabar).sqrt(), t, like)

    def beta(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """beta_t, broadcast against `like`."""
        return _broadcast(self.betas, t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = a_t x0 + sigma_t eps (eq. 4 of Ho et al. 2020)."""
        return self.a(t, x0) * x0 + self.sigma(t, x0) * noise

    def eps_to_x0(self, z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = (z_t - sigma_t eps) / a_t."""
        return (z_t - self.sigma(t, z_t) * eps) / self.a(t, z_t)

    def x0_to_eps(self, z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (z_t - a_t x0) / sigma_t."""
        return (z_t - self.a(t, z_t) * x0) / self.sigma(t, z_t)

    def model_output_to_eps(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a network output of this schedule's prediction type to eps.

        v-prediction (Salimans & Ho 2022): v = a_t eps - sigma_t x0, so eps = sigma_t z_t + a_t v.
        """
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "v_prediction":
            return self.sigma(t, z_t) * z_t + self.a(t, z_t) * output
        return self.x0_to_eps(z_t, output, t)

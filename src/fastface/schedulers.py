"""Samplers that diffusers lacks in the exact form an adapter's authors use.

:class:`KarrasDPMSolverPP2MScheduler` is k-diffusion's ``sample_dpmpp_2m`` on Karras sigmas over
SDXL's discrete noise table, driving an ε-prediction UNet as k-diffusion's discrete-time
denoiser does (input scaled by ``1/√(σ² + 1)``, the UNet timestep = the index of the nearest
table σ in log space, ``denoised = x − σ·ε``). It is PuLID v1.1's sampler for non-Lightning SDXL
(``pulid/pipeline_v1_1.py``). diffusers' ``DPMSolverMultistepScheduler(use_karras_sigmas=True)``
is the same solver in variance-preserving coordinates, but it starts from unit-variance noise
instead of ``σ_max``-scaled noise and rounds an interpolated timestep: its latents differ.

It follows the diffusers scheduler protocol (``set_timesteps``, ``scale_model_input``, ``step``,
``init_noise_sigma``, one UNet evaluation per step), and keeps its per-call state (the previous
denoised estimate) on the instance, which the engine creates fresh for every call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput


class KarrasDPMSolverPP2MScheduler(SchedulerMixin, ConfigMixin):
    """DPM-Solver++(2M) with Karras sigmas (ρ = 7), k-diffusion's formulation, ε-prediction."""

    order = 1
    # Built from an SDXL pipeline's scheduler config: the other schedulers' keys are expected, not warned about.
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 rho: float = 7.0, **_ignored: Any) -> None:
        # The table as k-diffusion / PuLID build it: float64 betas and cumulative product, then float32.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.tensor(np.cumprod((1.0 - betas).numpy(), axis=0), dtype=torch.float32)
        self.table_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.table_sigmas.log()
        self.sigmas = torch.zeros(0)
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self.num_inference_steps: int | None = None
        self._step_index = 0
        self._old_denoised: torch.Tensor | None = None

    @property
    def init_noise_sigma(self) -> float:
        return float(self.sigmas[0])

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._step_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **_: Any) -> None:
        rho = self.config.rho
        ramp = torch.linspace(0, 1, num_inference_steps)
        min_inv_rho = self.table_sigmas[0] ** (1 / rho)
        max_inv_rho = self.table_sigmas[-1] ** (1 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
        # nearest table entry in log σ (k-diffusion's DiscreteSchedule.sigma_to_t, quantised)
        dists = sigmas.log()[None, :] - self.log_sigmas[:, None]
        self.timesteps = dists.abs().argmin(dim=0).to(device=device)
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._old_denoised = None

    # The coefficients are computed on the host in float32, as k-diffusion computes them, and enter
    # the device arithmetic as Python scalars: no per-step host-to-device copy, same float32 values.

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        sigma = self.sigmas[self._step_index]
        return sample / float((sigma**2 + 1.0) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             **_: Any) -> SchedulerOutput | tuple[torch.Tensor]:
        i = self._step_index
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        denoised = sample - model_output * float(sigma)
        t, t_next = -sigma.log(), -sigma_next.log()
        h = t_next - t
        ratio = float((-t_next).exp() / (-t).exp())
        coefficient = float((-h).expm1())
        if self._old_denoised is None or i + 1 == len(self.sigmas) - 1:
            prev = ratio * sample - coefficient * denoised
        else:
            r = (t + self.sigmas[i - 1].log()) / h
            corrected = float(1 + 1 / (2 * r)) * denoised - float(1 / (2 * r)) * self._old_denoised
            prev = ratio * sample - coefficient * corrected
        self._old_denoised = denoised
        self._step_index = i + 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
